"""Export a run's EMA params as a params run: the small directory trained models ship in.

    python -m experiments.export_params --workdir runs/mnist --out pretrained/mnist_unet
    python -m experiments.export_params --workdir runs/mnist/posthoc_ema/sigma_rel_0.1 --out pretrained/mnist_unet \\
        --check_num 128 --check_seeds 5 --data_source idx --data_path DIR

Writes ``<out>/config.json``, ``<out>/params.msgpack`` (the EMA params of ``--step``, default the
latest, float32) and ``<out>/meta.json`` (the checkpoint's metadata, where the params come from,
this command's provenance), whole or not at all (``ddpm_jax.run_writer.write_params_run``). An
absolute ``data.path`` (this machine's) is cleared, and ``data.source`` ``idx`` becomes ``auto``
(the per-user cache, downloaded once), so the directory means the same on any machine.
``experiments.sample`` and ``evaluate`` read the directory as a run (``ddpm_jax.runs.load_run``).

With ``--check_num N`` (MNIST-shaped runs) it also writes what lets anyone check the params
without the data: ``<out>/test_classifier_stats.npz``, the classifier-feature statistics of the
whole test split, and ``<out>/check_n<N>.json``, the classifier FID against them of N samples drawn
with the config's sampler for each seed 0..K−1 (K = ``--check_seeds``), their mean and standard
deviation. ``tests/test_shipped_params.py`` redraws seed 0 and compares.

Bad input (no run, an unknown step, an occupied ``--out`` without ``--overwrite``, a missing data
path): one ``error:`` line, exit 2, nothing written.
"""

import os
import time

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory (experiments.train, posthoc_ema, import_checkpoint).")
flags.DEFINE_integer("step", None, "The checkpoint to export (default: the latest).")
flags.DEFINE_string("out", None, "The params run to write (absent or empty unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace --out once the new one is written whole.")
flags.DEFINE_integer("check_num", 0, "Samples per check seed (0: no check files).", lower_bound=0)
flags.DEFINE_integer("check_seeds", 5, "Check seeds 0..K-1: their spread is the check's tolerance.", lower_bound=2)
flags.DEFINE_integer("batch_size", 500, "Samples per compiled batch.", lower_bound=1)
flags.DEFINE_string("data_source", None, "Override the run's config.data.source (e.g. idx) for the test split.")
flags.DEFINE_string("data_path", None, "Override the run's config.data.path.")
flags.mark_flags_as_required(["workdir", "out"])

#: The check files of a params run (``--check_num``).
STATS_FILE = "test_classifier_stats.npz"


def check_file(num: int) -> str:
    return f"check_n{num}.json"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.check_num == 1:
        cli.fail("--check_num=1: a FID needs at least 2 samples (0: no check)")
    from experiments import sampler_flags

    sampler_flags.quiet_logs()
    import json

    import numpy as np

    from ddpm_jax import data, provenance
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.evaluation import classifier_statistics, sample_classifier_fid
    from ddpm_jax.files import os_error_line, write_json
    from ddpm_jax.metrics import fid
    from ddpm_jax.run_writer import RunExistsError, is_free, write_params_run
    from ddpm_jax.runs import load_run, sampling_tag

    out = os.path.abspath(FLAGS.out)
    if not is_free(out) and not FLAGS.overwrite:
        cli.fail(f"--out {out} is not empty: give another directory or --overwrite")
    try:
        run = load_run(FLAGS.workdir, FLAGS.step)
        splits = None
        if FLAGS.check_num:
            if tuple(run.image_shape) != (28, 28, 1):
                raise ValueError(f"--check_num needs MNIST-shaped images (28, 28, 1); the run's are {run.image_shape}")
            splits = data.splits_from_config(run.config, source=FLAGS.data_source, path=FLAGS.data_path)
            if splits.test is None or len(splits.test) < 2:
                raise ValueError("--check_num: the run's data has no test split")
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(e)

    meta = provenance.relative_paths(json.loads(json.dumps(run.meta, default=lambda o: np.asarray(o).tolist())))
    meta.update(step=run.step, image_shape=list(run.image_shape),
                exported_from={"workdir": provenance.relative(run.workdir), "step": run.step, "params": "ema"},
                provenance=provenance.record())
    meta.setdefault("steps_per_epoch", 1)
    config = run.config.to_dict()
    if os.path.isabs(config["data"].get("path") or ""):  # a path of this machine: the shipped run finds its data as a fresh one
        meta["exported_from"]["data"] = {"source": config["data"]["source"], "path": provenance.relative(config["data"]["path"])}
        config["data"].update(path="", source="auto" if config["data"]["source"] == "idx" else config["data"]["source"])
    try:
        write_params_run(out, config, run.ema_params, meta, overwrite=FLAGS.overwrite)
    except RunExistsError as e:
        cli.fail(e)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    size = os.path.getsize(os.path.join(out, "params.msgpack"))
    print(f"{out}: EMA params of step {run.step} ({size / 2**20:.2f} MiB)", flush=True)
    if not FLAGS.check_num:
        return

    t0 = time.time()
    test01 = np.asarray(data.unscale_images(splits.test, run.data_scale), np.float32)
    stats = classifier_statistics(test01)
    fid.save_statistics(os.path.join(out, STATS_FILE), stats["mu"], stats["sigma"], stats["n"], stats["extractor_id"],
                        stats["extractor_version"], extra={"provenance": json.dumps(provenance.record())})
    shipped = load_run(out)  # what a user gets: the directory as written
    values = []
    for seed in range(FLAGS.check_seeds):
        values.append(sample_classifier_fid(shipped, FLAGS.check_num, seed, stats, batch_size=FLAGS.batch_size))
        print(f"seed {seed}: classifier FID {values[-1]:.3f} (N = {FLAGS.check_num}, vs the {stats['n']} test images)",
              flush=True)
    report = {"num": FLAGS.check_num, "seeds": list(range(FLAGS.check_seeds)), "fid_classifier": values,
              "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)),
              "sampler": sampling_tag(shipped.sampler_options()), "reference": STATS_FILE,
              "reference_images": int(stats["n"]), "seconds": time.time() - t0, "provenance": provenance.record()}
    path = write_json(os.path.join(out, check_file(FLAGS.check_num)), report)
    print(f"mean {report['mean']:.3f}, sd {report['sd']:.3f} over {FLAGS.check_seeds} seeds -> {path}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
