"""Evaluate a trained run: FIDs (pixel and classifier features) with their real-vs-real floors,
and the lecture's sample-quality metrics.

    python -m experiments.evaluate --workdir runs/mnist --method eps_ddpm --num 10000
    python -m experiments.evaluate --workdir runs/mnist --num 1000      # the notebook's protocol size
    python -m experiments.evaluate --workdir runs/mnist --samples runs/mnist/samples/eps_ddpm/samples.npz

Samples are drawn with the sampling module (EMA params by default) unless ``--samples`` gives a
``samples.npz`` from ``experiments.sample`` (or an ``.npy`` array). Prints a table and writes
``<workdir>/eval/<sampler>_n<N>.json`` (or ``--out``), atomically, with the command's
provenance (``ddpm_jax.provenance``). For ``--samples`` the report's sampler, step, params and
sampling seed are the ones the file records (its ``meta``), never the run's config: a file that
records none (an ``.npy`` array, another program's output) is reported with ``"sampler": null``,
and sampler flags beside ``--samples`` are refused (they describe drawing new samples).

The field's sample metrics (``ddpm_jax.metrics.inception_metrics``: Inception FID, Inception Score,
KID, precision/recall on pytorch-fid's Inception-v3) are added with ``--inception_weights`` and/or
``--reference``; the DDPM paper's CIFAR-10 protocol is 50,000 samples against the training set::

    python -m experiments.evaluate --workdir runs/ddpm_cifar10 --num 50000 \
        --inception_weights pt_inception-2015-12-05-6726825d.pth --reference stats/cifar10_train.npz

Without ``--reference`` the Inception FID is against N random images of the run's training split;
KID and precision/recall always are; the real-vs-real floor (N validation vs N training images,
disjoint by construction) is reported where the validation split holds N. N must exceed 2048, the
weights must be pytorch-fid's file (SHA-256) and the reference statistics of the same extractor and
dimension: checked before sampling.

Given samples are checked before any work (``ddpm_jax.sample_files``): the file, the ``samples``
key, dtype, shape, finiteness and value range in the run's data scale; each problem is one
``error:`` line and exit 2. ``--allow_out_of_range`` evaluates samples that leave the range as
they are. Evaluation needs no lock and works beside a running trainer.
"""

import os
import time

from absl import app, flags

from experiments import cli, sampler_flags

FLAGS = flags.FLAGS
sampler_flags.define(num=10000, batch_size=500, min_num=2)  # --num: samples, and real images per comparison
flags.DEFINE_integer("seed", 0, "Seed for sampling and for the random real subsets.")
flags.DEFINE_integer("trajectory_samples", 64, "Samples whose trajectory gives the trajectory metrics (0: skip).")
flags.DEFINE_string("samples", None, "Evaluate these samples (an .npz with 'samples') instead of drawing new ones.")
flags.DEFINE_string("data_source", None, "Override the run's config.data.source (e.g. idx).")
flags.DEFINE_string("data_path", None, "Override the run's config.data.path.")
flags.DEFINE_string("out", None, "Where to write the JSON report.")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds the Inception "
                    "FID, IS, KID and precision/recall (with --reference alone: the weights of the per-user cache).")
flags.DEFINE_string("reference", None, "FID statistics (.npz in pytorch-fid's layout: experiments.reference_stats, or "
                    "TTUR's) for the Inception FID; without it, N training images of the run's data.")
flags.DEFINE_integer("inception_batch_size", 200, "Images per compiled Inception call.", lower_bound=1)
flags.DEFINE_bool("allow_other_weights", False, "Accept --inception_weights whose SHA-256 is not pytorch-fid's file's.")
flags.DEFINE_bool("allow_out_of_range", False, "Evaluate --samples whose values lie outside the run's data range "
                  "(by more than ddpm_jax.sample_files allows) as they are, instead of refusing them.")


def _inception_setup():
    """(weights, reference statistics or None) for the Inception metrics; ValueError /
    FileNotFoundError (one line) for N <= 2048, a weights file that is not pytorch-fid's or a
    reference of another extractor or dimension."""
    from ddpm_jax.metrics import inception, inception_metrics

    from ddpm_jax.files import os_error_line

    inception_metrics.check_fid_size(FLAGS.num, "samples (--num)")
    try:
        weights = inception.load_weights(FLAGS.inception_weights,
                                         expected_sha256=None if FLAGS.allow_other_weights else inception.FID_WEIGHTS_SHA256)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"the Inception weights cannot be read or cached: {os_error_line(e)}") from None
    reference = None
    if FLAGS.reference:
        reference = inception_metrics.load_statistics(FLAGS.reference)
        try:
            inception_metrics.check_reference(reference, weights.sha256)
        except ValueError as e:
            raise ValueError(f"--reference {FLAGS.reference}: {e}") from None
    return weights, reference


def _inception_report(samples, splits, scale, weights, reference):
    """The Inception metrics of the samples (model space) against the run's data and ``reference``."""
    import numpy as np

    from ddpm_jax import data, provenance
    from ddpm_jax.metrics import inception_metrics

    gen = np.clip(np.asarray(data.unscale_images(samples, scale, clip=False), np.float32), 0.0, 1.0)
    out = inception_metrics.evaluate_images(
        gen, weights, real=np.asarray(data.unscale_images(splits.train, scale), np.float32),
        held_out=np.asarray(data.unscale_images(splits.val, scale), np.float32), reference=reference,
        seed=FLAGS.seed, batch_size=FLAGS.inception_batch_size, progress=True)
    out["reference"] = None if reference is None else provenance.relative(FLAGS.reference)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sampler_flags.quiet_logs()
    import jax
    import numpy as np

    from ddpm_jax import data, provenance, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.evaluation import evaluate_samples, format_report
    from ddpm_jax.files import check_writable, os_error_line, write_json
    from ddpm_jax.runs import sampling_tag
    from ddpm_jax.sample_files import SamplesError, check_samples, load_samples, read_meta

    try:
        if FLAGS.samples:
            drawn_with = sampler_flags.present_sampler_flags()
            if drawn_with:
                raise ValueError(f"--{drawn_with[0]} describes drawing new samples; --samples {FLAGS.samples} records "
                                 "the sampler that drew it (drop the sampler flags)")
        run, opts = sampler_flags.run_and_options()
        given = meta = None
        if FLAGS.samples:  # the file first: a bad one is refused before the data are loaded
            given, file_scale = load_samples(FLAGS.samples)
            meta = read_meta(FLAGS.samples)
        splits = data.splits_from_config(run.config, source=FLAGS.data_source, path=FLAGS.data_path)
        if given is not None:
            try:
                given = check_samples(given, image_shape=splits.image_shape, scale=run.data_scale, file_scale=file_scale,
                                      real_mean=float(splits.train.mean()), check_range=not FLAGS.allow_out_of_range)
            except SamplesError as e:
                raise SamplesError(f"--samples {FLAGS.samples}: {e}") from None
            if given.shape[0] < FLAGS.num:
                raise ValueError(f"--samples {FLAGS.samples} holds {given.shape[0]} samples, fewer than --num={FLAGS.num}")
        inception_weights = reference = None
        if FLAGS.inception_weights or FLAGS.reference:  # checked before any sampling
            inception_weights, reference = _inception_setup()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(str(e))

    if given is None:
        tag = sampling_tag(opts)
    elif meta is not None and meta.get("sampler_tag"):
        tag = meta["sampler_tag"]
    else:  # an unrecorded file: named after its directory, and reported with no sampler
        tag = os.path.splitext(os.path.basename(os.path.dirname(os.path.abspath(FLAGS.samples))))[0]
    out = os.path.abspath(FLAGS.out or os.path.join(run.workdir, "eval", f"{tag}_n{FLAGS.num}.json"))
    try:
        check_writable(os.path.dirname(out), "--out's directory" if FLAGS.out else "the eval directory", need_bytes=2**20)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)

    key = jax.random.PRNGKey(FLAGS.seed)
    ema = FLAGS.params == "ema"
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
    if inception_weights is not None:
        t0 = time.time()
        report["inception"] = _inception_report(np.asarray(samples), splits, run.data_scale, inception_weights, reference)
        timing["inception_s"] = time.time() - t0
    if given is None:
        drawn = {"step": run.step, "params": FLAGS.params, "sampler": {k: v for k, v in opts.items() if k != "clip_x0"},
                 "clip_x0": opts["clip_x0"], "sampling_seed": FLAGS.seed}
    else:  # what the file says drew it, or null: never the run's config
        m = meta or {}
        sampler = m.get("sampler")
        drawn = {"step": m.get("step"), "params": m.get("params"),
                 "sampler": None if sampler is None else {k: v for k, v in sampler.items() if k != "clip_x0"},
                 "clip_x0": None if sampler is None else sampler.get("clip_x0"), "sampling_seed": m.get("seed"),
                 "samples": {"path": provenance.relative(FLAGS.samples), "recorded": meta is not None,
                             "workdir": m.get("workdir"), "provenance": m.get("provenance")}}
    report.update({"workdir": provenance.relative(run.workdir), **drawn, "seed": FLAGS.seed, "timing": timing,
                   "provenance": provenance.record()})
    try:
        write_json(out, report)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    print(format_report(report))
    if "inception" in report:
        from ddpm_jax.metrics import inception_metrics

        print(inception_metrics.format_line(report["inception"]))
    print(f"-> {out}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
