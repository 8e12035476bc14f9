"""What the study scripts (``experiments/study_*.py``) share: their absl flags, the training runs
they need (configs/mnist.py at the study's budget, trained or reused), scoring a sampler on a run,
and writing their JSON.

A study's workdir holds ``<study>.json`` (every number its page section quotes), its PNG figures,
and, unless ``runs_dir`` says otherwise, ``runs/<variant>/`` — ordinary ``experiments.train``
workdirs, so any of them can be sampled or evaluated on its own afterwards.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(study: str) -> None:
    """--config (configs/studies.py:<study>) and --workdir (runs/study_<study>)."""
    config_flags.DEFINE_config_file("config", f"configs/studies.py:{study}", "A study config (configs/studies.py:<study>[_cpu]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", f"runs/study_{study}", "Where the study writes its JSON, figures and (by default) runs.")
    flags.DEFINE_integer("cpu_devices", 0, "CPU only: JAX devices to split each batch over; 0 = one per core (the largest "
                         "count <= the cores that divides the training and sampling batches). No effect on GPU/TPU.",
                         lower_bound=0)
    from experiments import cli

    cli.define_platform_flag()


def start(study: str):
    """(config, workdir) from the flags: the workdir created, the platform profile applied
    (``ddpm_jax.platform_profile``); exits with one line if --config is another study's or the workdir
    is unusable."""
    config = FLAGS.config
    from ddpm_jax import platform_profile
    from experiments import sampler_flags

    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices,
                           batch_sizes=[config.train.batch_size, config.eval.batch_size])

    sampler_flags.quiet_logs()
    if config.study != study:
        fail(f"--config is the {config.study!r} study's config; this script runs {study!r} (configs/studies.py:{study})")
    from ddpm_jax.trainer import prepare_workdir

    try:
        return config, prepare_workdir(FLAGS.workdir)
    except (ValueError, OSError) as e:
        fail(str(e))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def log(message: str) -> None:
    print(message, flush=True)


def training_config(study_config, variant: str, **overrides):
    """configs/mnist.py:<variant> at the study's data, seed and budget; ``overrides`` use '__' for
    dots (``model__preset='medium'``). Validated (ConfigError names the key)."""
    from configs import mnist
    from ddpm_jax.config import validate_config

    c = mnist.get_config(variant)
    c.seed = study_config.seed
    c.data.source, c.data.path = study_config.data.source, study_config.data.path
    b = study_config.train
    c.schedule.num_steps = study_config.schedule_num_steps
    c.train.num_epochs, c.train.num_steps, c.train.batch_size = b.num_epochs, b.num_steps, b.batch_size
    c.data.train_size, c.data.val_size = b.train_size, b.val_size
    c.optim.decay_every_epochs = b.decay_every_epochs
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    validate_config(c)
    return c


def runs_dir(study_config, workdir: str) -> str:
    return os.path.abspath(study_config.runs_dir or os.path.join(workdir, "runs"))


def train(config, workdir: str) -> Dict[str, Any]:
    """Trains the run in ``workdir`` to the end of its budget (resuming, or reusing a finished
    run: then only its final evaluation and grid are redone). Returns the trainer's summary plus
    'seconds' (this call's wall time)."""
    from ddpm_jax.trainer import train_and_evaluate

    t0 = time.time()
    log(f"== training {config.objective.name} / {config.model.preset} in {workdir}")
    summary = train_and_evaluate(config, workdir)
    if summary["stopped_by"]:
        fail(f"the run in {workdir} stopped ({summary['stopped_by']}); run the study again to resume it")
    summary["seconds"] = time.time() - t0
    return summary


def load_splits(run, study_config=None):
    """The run's data splits; ``study_config`` (if given) repoints the source and path."""
    from ddpm_jax import data

    if study_config is None:
        return data.splits_from_config(run.config)
    return data.splits_from_config(run.config, source=study_config.data.source, path=study_config.data.path)


def score(run, splits, options: dict, eval_config, *, grid_path: Optional[str] = None, trajectory_samples: int = 0):
    """Draws ``eval_config.num_samples`` samples from ``run`` with sampler ``options``
    (``run.sampler_options(...)``) and scores them with :func:`ddpm_jax.evaluation.evaluate_samples`
    (FIDs with floors, the lecture's table, and the trajectory metrics of ``trajectory_samples``
    extra samples). Adds 'sampler', 'sample_seconds', 'images_per_sec'; saves a grid of the first 64.

    Returns ``(report, samples, trajectory)``: samples ``(N, H, W, C)`` in model space; the
    trajectory (``sampling.sample``'s dict, NumPy) or None."""
    import jax
    import numpy as np

    from ddpm_jax import data, plots, sampling
    from ddpm_jax.evaluation import evaluate_samples

    e = eval_config
    key = jax.random.PRNGKey(e.seed)
    fn = run.make_sampler(e.batch_size, options).compile(key)  # compiled outside the timing
    t0 = time.time()
    x = sampling.sample_in_batches(fn, e.num_samples, e.batch_size, key)
    dt = time.time() - t0
    traj = None
    if trajectory_samples:
        _, traj = run.make_sampler(trajectory_samples, options, return_trajectory=True)(jax.random.fold_in(key, 10**6))
        traj = jax.device_get(traj)
    report = evaluate_samples(np.asarray(x), splits, scale=run.data_scale, seed=e.seed, trajectory=traj)
    report["sampler"] = {k: v for k, v in options.items() if k != "clip_x0"}
    report.update(sample_seconds=dt, images_per_sec=e.num_samples / dt, step=run.step, workdir=run.workdir)
    if grid_path:
        plots.save_image_grid(np.asarray(data.unscale_images(x[:64], run.data_scale)), grid_path,
                              title=f"{options['method']}, {run.config.objective.name} model, step {run.step}")
    return report, np.asarray(x), traj


def headline(report: Dict[str, Any]) -> str:
    """One line: the notebook-protocol pixel FID, pixel and classifier FID vs test, and the floors."""
    nb, px, cl = report["fid_pixel_notebook"], report["fid_pixel"], report.get("fid_classifier", {})
    return (f"pixel FID (notebook) {nb.get('vs_pool', float('nan')):.3f} [floor {nb.get('floor_pool_vs_pool', float('nan')):.3f}]  "
            f"pixel FID test {px.get('test', float('nan')):.3f} [floor {px.get('floor_train_vs_test', float('nan')):.3f}]  "
            f"classifier FID test {cl.get('test', float('nan')):.2f} [floor {cl.get('floor_train_vs_test', float('nan')):.2f}]")


def write_json(workdir: str, name: str, obj: Dict[str, Any]) -> str:
    """Writes ``obj`` with the command's provenance (``ddpm_jax.provenance``) to ``workdir/name``."""
    from ddpm_jax import provenance

    obj = {**provenance.relative_paths(obj), "provenance": provenance.record()}
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(path + ".tmp", path)
    log(f"-> {path}")
    return path


def csv_list(text: str, cast=str):
    return [cast(s.strip()) for s in str(text).split(",") if s.strip()]


def csv_choices(text: str, valid, key: str):
    """The comma-separated names in ``text``; exits with one line naming config.<key> if one is
    not in ``valid`` or there are none."""
    items = csv_list(text)
    unknown = [v for v in items if v not in valid]
    if unknown or not items:
        fail(f"config.{key}: unknown {unknown}; valid: {sorted(valid)}" if unknown else f"config.{key} is empty")
    return items
