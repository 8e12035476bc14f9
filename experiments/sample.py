"""Draw samples from a trained run.

    python -m experiments.sample --workdir runs/mnist --method eps_ddpm --num 1000
    python -m experiments.sample --workdir runs/mnist --method ddim --num_steps 50 --num 1000

Restores the latest checkpoint (EMA params unless ``--params=raw``), samples in batches (one
compiled ``lax.scan`` serves every batch) with a progress bar, and writes
``<out>/samples.npz`` (``samples``: (N, H, W, C) in the data's scale; ``images``: the same mapped
to [0, 1] and clipped) and ``<out>/grid.png`` (the first 100). ``<out>`` defaults to
``<workdir>/samples/<tag>`` with ``ddpm_jax.runs.sampling_tag``'s name for the options
(e.g. ``eps_ddpm``, ``eps_ddpm_posterior``, ``ddim_steps50_eta0``).
"""

import os
import sys
import time

from absl import app, flags

from experiments import sampler_flags

FLAGS = flags.FLAGS
sampler_flags.define(num=1000, batch_size=250)
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Output directory (default under <workdir>/samples/).")


def _devices(batch_size: int) -> str:
    import jax

    from ddpm_jax import data

    sharding = data.batch_sharding(batch_size)  # the split make_sampler uses
    return f"{1 if sharding is None else len(sharding.device_set)} {jax.devices()[0].platform} device(s)"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sampler_flags.quiet_logs()
    import jax
    import numpy as np

    from ddpm_jax import data, plots, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.runs import sampling_tag

    try:
        run, opts = sampler_flags.run_and_options()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    method, clip = opts["method"], opts["clip_x0"] is not None
    out = os.path.abspath(FLAGS.out or os.path.join(run.workdir, "samples", sampling_tag(opts)))
    os.makedirs(out, exist_ok=True)
    one_batch = run.make_sampler(FLAGS.batch_size, opts, ema=FLAGS.params == "ema")

    print(f"run {run.workdir} step {run.step} ({FLAGS.params} params); {method}{' (x̂_0 clipped)' if clip else ''}, "
          f"{FLAGS.num_steps or run.schedule.num_steps} steps; {FLAGS.num} samples in batches of {FLAGS.batch_size}"
          f" on {_devices(FLAGS.batch_size)}", flush=True)
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
