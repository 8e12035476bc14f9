"""Evaluate a trained run: FIDs (pixel and classifier features) with their real-vs-real floors,
and the lecture's sample-quality metrics.

    python -m experiments.evaluate --workdir runs/mnist --method eps_ddpm --num 10000
    python -m experiments.evaluate --workdir runs/mnist --num 1000      # the notebook's protocol size
    python -m experiments.evaluate --workdir runs/mnist --samples runs/mnist/samples/eps_ddpm/samples.npz

Samples are drawn with the sampling module (EMA params by default) unless ``--samples`` gives a
``samples.npz`` from ``experiments.sample``. Prints a table and writes
``<workdir>/eval/<sampler>_n<N>.json`` (or ``--out``).
"""

import json
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
flags.DEFINE_string("method", None, "Sampler (default: the run's config.sampling.method).")
flags.DEFINE_integer("num", 10000, "Number of samples (and of real images in each comparison).")
flags.DEFINE_integer("batch_size", 500, "Samples per compiled batch.")
flags.DEFINE_integer("num_steps", None, "DDIM steps (method ddim only).")
flags.DEFINE_float("eta", 0.0, "DDIM eta.")
flags.DEFINE_enum("ddpm_variance", None, ["posterior", "beta"], "eps_ddpm noise variance (default: the run's config).")
flags.DEFINE_bool("clip_x0", None, "Clip x̂_0 to the data range each step (default: the run's config).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Which params to sample with.")
flags.DEFINE_integer("seed", 0, "Seed for sampling and for the random real subsets.")
flags.DEFINE_integer("trajectory_samples", 64, "Samples whose trajectory gives the trajectory metrics (0: skip).")
flags.DEFINE_string("samples", None, "Evaluate these samples (an .npz with 'samples') instead of drawing new ones.")
flags.DEFINE_string("data_source", None, "Override the run's config.data.source (e.g. idx).")
flags.DEFINE_string("data_path", None, "Override the run's config.data.path.")
flags.DEFINE_string("out", None, "Where to write the JSON report.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from ddpm_jax import data, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.evaluation import evaluate_samples, format_report
    from ddpm_jax.runs import load_run, sampling_tag

    try:
        if FLAGS.num < 2 or FLAGS.batch_size < 1:
            raise ValueError(f"--num={FLAGS.num} must be >= 2 and --batch_size={FLAGS.batch_size} >= 1")
        run = load_run(FLAGS.workdir)
        opts = run.sampler_options(FLAGS.method, num_steps=FLAGS.num_steps, eta=FLAGS.eta,
                                   ddpm_variance=FLAGS.ddpm_variance, clip_x0=FLAGS.clip_x0)
        d = run.config.data
        source, path = FLAGS.data_source or d.source, FLAGS.data_path or d.path
        splits = data.load_splits(source, name=d.name, path=path or None, scale=d.scale, train_size=d.train_size,
                                  val_size=d.val_size, seed=run.config.seed)
        given = None
        if FLAGS.samples:
            if not os.path.exists(FLAGS.samples):
                raise FileNotFoundError(f"--samples {FLAGS.samples} does not exist")
            given = np.load(FLAGS.samples)["samples"]
            if given.shape[0] < FLAGS.num:
                raise ValueError(f"--samples holds {given.shape[0]} samples, fewer than --num={FLAGS.num}")
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    key = jax.random.PRNGKey(FLAGS.seed)
    ema = FLAGS.params == "ema"
    tag = sampling_tag(opts) if given is None else os.path.splitext(os.path.basename(os.path.dirname(os.path.abspath(FLAGS.samples))))[0]
    print(f"run {run.workdir} step {run.step}; {'samples from ' + FLAGS.samples if given is not None else tag}; N = {FLAGS.num}", flush=True)
    timing = {}
    if given is None:
        t0 = time.time()
        samples = sampling.sample_in_batches(run.make_sampler(FLAGS.batch_size, opts, ema=ema), FLAGS.num, FLAGS.batch_size, key)
        timing["sample_s"] = time.time() - t0
    else:
        samples = given[: FLAGS.num]
    traj = None
    if FLAGS.trajectory_samples > 0 and given is None:
        _, traj = run.make_sampler(FLAGS.trajectory_samples, opts, ema=ema, return_trajectory=True)(jax.random.fold_in(key, 10**6))
        traj = jax.device_get(traj)
    t0 = time.time()
    report = evaluate_samples(np.asarray(samples), splits, scale=d.scale, seed=FLAGS.seed, trajectory=traj)
    timing["metrics_s"] = time.time() - t0
    report.update({"workdir": run.workdir, "step": run.step, "params": FLAGS.params, "sampler": {k: v for k, v in opts.items() if k != "clip_x0"},
                   "clip_x0": opts["clip_x0"], "timing": timing})
    out = os.path.abspath(FLAGS.out or os.path.join(run.workdir, "eval", f"{tag}_n{FLAGS.num}.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report))
    print(f"-> {out}", flush=True)


if __name__ == "__main__":
    app.run(main)
