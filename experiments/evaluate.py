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

from absl import app, flags

from experiments import sampler_flags

FLAGS = flags.FLAGS
sampler_flags.define(num=10000, batch_size=500, min_num=2)  # --num: samples, and real images per comparison
flags.DEFINE_integer("seed", 0, "Seed for sampling and for the random real subsets.")
flags.DEFINE_integer("trajectory_samples", 64, "Samples whose trajectory gives the trajectory metrics (0: skip).")
flags.DEFINE_string("samples", None, "Evaluate these samples (an .npz with 'samples') instead of drawing new ones.")
flags.DEFINE_string("data_source", None, "Override the run's config.data.source (e.g. idx).")
flags.DEFINE_string("data_path", None, "Override the run's config.data.path.")
flags.DEFINE_string("out", None, "Where to write the JSON report.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sampler_flags.quiet_logs()
    import jax
    import numpy as np

    from ddpm_jax import data, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.evaluation import evaluate_samples, format_report
    from ddpm_jax.runs import sampling_tag

    try:
        run, opts = sampler_flags.run_and_options()
        splits = data.splits_from_config(run.config, source=FLAGS.data_source, path=FLAGS.data_path)
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
    report = evaluate_samples(np.asarray(samples), splits, scale=run.data_scale, seed=FLAGS.seed, trajectory=traj)
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
