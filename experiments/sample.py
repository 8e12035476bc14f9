"""Draw samples from a trained run.

    python -m experiments.sample --workdir runs/mnist --method eps_ddpm --num 1000
    python -m experiments.sample --workdir runs/mnist --method ddim --num_steps 50 --num 1000

Restores the latest checkpoint (EMA params unless ``--params=raw``), samples in batches (one
compiled ``lax.scan`` serves every batch) with a progress bar, and writes
``<out>/samples.npz`` (``samples``: (N, H, W, C) in the data's scale; ``images``: the same mapped
to [0, 1] and clipped) and ``<out>/grid.png`` (the first 100). ``<out>`` defaults to
``<workdir>/samples/<method>[_steps<S>][_eta<eta>]``.
"""

import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
flags.DEFINE_string("method", None, "Sampler (default: the run's config.sampling.method).")
flags.DEFINE_integer("num", 1000, "Number of samples.")
flags.DEFINE_integer("batch_size", 250, "Samples per compiled batch.")
flags.DEFINE_integer("num_steps", None, "DDIM steps (method ddim only; default T).")
flags.DEFINE_float("eta", 0.0, "DDIM eta in [0, 1].")
flags.DEFINE_enum("ddpm_variance", None, ["posterior", "beta"], "eps_ddpm noise variance (default: the run's config).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Which params to sample with.")
flags.DEFINE_bool("clip_x0", None, "Clip x̂_0 to the data range each step (default: the run's config.sampling.clip_x0).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("out", None, "Output directory (default under <workdir>/samples/).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from ddpm_jax import data, plots, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.runs import load_run, sampling_tag

    try:
        if FLAGS.num < 1 or FLAGS.batch_size < 1:
            raise ValueError(f"--num={FLAGS.num} and --batch_size={FLAGS.batch_size} must be >= 1")
        run = load_run(FLAGS.workdir, FLAGS.step)
        opts = run.sampler_options(FLAGS.method, num_steps=FLAGS.num_steps, eta=FLAGS.eta,
                                   ddpm_variance=FLAGS.ddpm_variance, clip_x0=FLAGS.clip_x0)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    method, clip = opts["method"], opts["clip_x0"] is not None
    out = os.path.abspath(FLAGS.out or os.path.join(run.workdir, "samples", sampling_tag(opts)))
    os.makedirs(out, exist_ok=True)
    one_batch = run.make_sampler(FLAGS.batch_size, opts, ema=FLAGS.params == "ema")

    print(f"run {run.workdir} step {run.step} ({FLAGS.params} params); {method}{' (x̂_0 clipped)' if clip else ''}, "
          f"{FLAGS.num_steps or run.schedule.num_steps} steps; {FLAGS.num} samples in batches of {FLAGS.batch_size}", flush=True)
    t0 = time.time()
    compiled = one_batch.lower(jax.random.PRNGKey(0)).compile()  # one program per batch, compiled once
    t_compile = time.time() - t0
    t0 = time.time()
    x = sampling.sample_in_batches(compiled, FLAGS.num, FLAGS.batch_size, jax.random.PRNGKey(FLAGS.seed))
    dt = time.time() - t0
    images = np.asarray(data.unscale_images(x, run.data_scale))
    np.savez_compressed(os.path.join(out, "samples.npz"), samples=x, images=images)
    plots.save_image_grid(images[:100], os.path.join(out, "grid.png"), title=f"{method}, step {run.step}")
    print(f"{FLAGS.num} samples in {dt:.1f}s ({FLAGS.num / dt:.1f} images/s; compile {t_compile:.1f}s) -> "
          f"{out}/samples.npz, {out}/grid.png", flush=True)


if __name__ == "__main__":
    app.run(main)
