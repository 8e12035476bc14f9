"""The progressive-distillation loop: ``distill(settings)`` (the maths: :mod:`ddpm_jax.distillation`).

Stages halve the sampler's steps, ``teacher_steps`` → ``teacher_steps``/2 → … → ``target_steps``.
Stage 1's student starts from the teacher run's EMA params and its teacher is that run; stage k's
student starts from stage k−1's student EMA params, which are also stage k's teacher. Each stage
trains ``steps_per_stage`` Adam steps of one jit-compiled step (the teacher's two DDIM steps and the
student's update), data-parallel over a 1-D device mesh like the training step.

The run has the trainer's guarantees: one process holds the workdir (:class:`ddpm_jax.workdir.WorkdirLock`);
Orbax checkpoints (:class:`ddpm_jax.checkpointing.Checkpointer`) hold the student's params,
optimiser state and EMA, the current teacher's params, and in their metadata the stage and the step
within it; Ctrl-C or SIGTERM saves and exits; the same command resumes bit for bit. Outputs::

    W/distill_settings.json      the settings (a rerun must match them to resume)
    W/checkpoints/<g>/           g = (stage index) · steps_per_stage + step in the stage
    W/metrics.jsonl              loss and gradient norm every log_every_steps steps
    W/stage_<N>steps/            each finished stage as a run directory (config.json, checkpoints/)
    W/distill.json               per stage: grid, steps, images, network evaluations, wall seconds;
                                 and the provenance of the command that wrote it
    W/provenance.jsonl           a line per command
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import data, platform_profile, provenance, rng, sharding
from ddpm_jax import distillation as dist
from ddpm_jax.checkpointing import Checkpointer, remove_partial_checkpoints
from ddpm_jax.config import ConfigError
from ddpm_jax.files import write_json
from ddpm_jax.objectives import PREDICTS
from ddpm_jax.resume import lock_workdir
from ddpm_jax.run_writer import write_run
from ddpm_jax.runs import is_params_run, load_run, saved_steps
from ddpm_jax.train_state import create_train_state, make_optimizer
from ddpm_jax.train_step import padded_size
from ddpm_jax.stop_signals import StopSignals
from ddpm_jax.trainer import NonFiniteError
from ddpm_jax.workdir import prepare_workdir, set_aside
from ddpm_jax.writers import MetricWriter

__all__ = ["Settings", "MUST_MATCH", "SETTINGS_FILE", "REPORT_FILE", "stage_dir_name", "check_settings", "distill",
           "distilled_config"]

SETTINGS_FILE = "distill_settings.json"
REPORT_FILE = "distill.json"
#: Settings a resumed distillation must share with the one that wrote the workdir. ``target_steps``
#: may change: the stages down to any target are the same, so a lower one continues a finished
#: distillation with more stages.
MUST_MATCH = ("teacher", "teacher_steps", "steps_per_stage", "student_param", "learning_rate", "lr_schedule",
              "batch_size", "ema_decay", "seed")
#: The value of a setting in a workdir written before the setting existed.
SAVED_DEFAULTS = {"lr_schedule": "constant"}
#: ``lr_schedule``: ``constant``, or ``linear`` from ``learning_rate`` to 0 over each stage (the
#: schedule of the paper's released distillation configs).
LR_SCHEDULES = ("constant", "linear")


def stage_dir_name(num_steps: int) -> str:
    """``stage_<N>steps``: the run directory of the stage whose student takes N steps."""
    return f"stage_{num_steps}steps"


@dataclasses.dataclass
class Settings:
    """What ``experiments.distill`` takes. ``batch_size`` 0: the teacher's ``train.batch_size``;
    ``data_source`` / ``data_path``: override the teacher's ``data.source`` / ``data.path``."""

    teacher: str
    workdir: str
    teacher_steps: int = 128
    target_steps: int = 4
    steps_per_stage: int = 2000
    student_param: str = "v"
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    batch_size: int = 0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every_steps: int = 500
    log_every_steps: int = 50
    max_nonfinite_steps: int = 20
    data_source: Optional[str] = None
    data_path: Optional[str] = None


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def check_settings(s: Settings) -> Dict[str, Any]:
    """Checks everything that can be checked without JAX and writes nothing: the teacher run, the
    stages, the numbers, and a workdir that is empty or holds a distillation of these settings.
    Returns the plan: the teacher's config dict, T, the stage sizes and the resolved settings dict.
    Raises ValueError / FileNotFoundError (CheckpointError: shipped params with an unreadable
    meta.json) with one line."""
    teacher = os.path.abspath(os.path.expanduser(s.teacher or ""))
    workdir = os.path.abspath(os.path.expanduser(s.workdir or ""))
    if not s.teacher or not os.path.isfile(os.path.join(teacher, "config.json")) \
            or not (is_params_run(teacher) or os.path.isdir(os.path.join(teacher, "checkpoints"))):
        raise FileNotFoundError(f"--teacher {teacher}: no training run there (expected config.json and checkpoints/ "
                                "written by experiments.train, or the params.msgpack of experiments.export_params)")
    if not saved_steps(teacher):
        raise FileNotFoundError(f"--teacher {teacher}: no checkpoint in {os.path.join(teacher, 'checkpoints')}")
    if not s.workdir:
        raise ValueError("--workdir is empty: give a directory for the distillation")
    if workdir == teacher or workdir == os.path.join(teacher, "checkpoints"):
        raise ValueError(f"--workdir {workdir} is the teacher's run directory: give a directory of its own")
    config = _read_json(os.path.join(teacher, "config.json"))
    needed = (("schedule", "num_steps"), ("objective", "name"), ("train", "batch_size"), ("sampling", "method"),
              ("model", "time_input"))
    missing = [f"{a}.{b}" for a, b in needed if not isinstance(config.get(a), dict) or b not in config[a]]
    if missing:
        raise ValueError(f"--teacher {teacher}: config.json lacks {', '.join(missing)}")
    T, model = int(config["schedule"]["num_steps"]), config["model"]
    if s.student_param not in dist.STUDENT_PARAMETERISATIONS:
        raise ValueError(f"--student_param={s.student_param!r}: must be one of {list(dist.STUDENT_PARAMETERISATIONS)}")
    dist.check_stages(s.teacher_steps, s.target_steps, T)
    if model.get("rho_head"):
        raise ValueError("the teacher has a ρ-head (model.rho_head): its output is a reverse mean by construction, so it "
                         "cannot be the student's v / x0 / eps head")
    distilled = (config.get("sampling") or {}).get("distilled_steps")
    if distilled:
        raise ValueError(f"the teacher is a student distilled for {distilled} steps on its own grid: to go on halving, "
                         "rerun the distillation that wrote it (the same --workdir and settings) with a lower --target_steps")
    if int(model.get("num_classes", 0) or 0):
        raise ValueError("the teacher is class-conditional (model.num_classes > 0): distillation handles unconditional "
                         "models only")
    for name, v, lo in (("steps_per_stage", s.steps_per_stage, 1), ("batch_size", s.batch_size, 0),
                        ("checkpoint_every_steps", s.checkpoint_every_steps, 1), ("log_every_steps", s.log_every_steps, 1),
                        ("max_nonfinite_steps", s.max_nonfinite_steps, 1), ("seed", s.seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"--{name}={v!r}: must be an integer >= {lo}")
    if not (isinstance(s.learning_rate, (int, float)) and math.isfinite(s.learning_rate) and s.learning_rate > 0):
        raise ValueError(f"--learning_rate={s.learning_rate!r}: must be a number > 0")
    if s.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr_schedule={s.lr_schedule!r}: must be one of {list(LR_SCHEDULES)}")
    if not (isinstance(s.ema_decay, (int, float)) and 0.0 <= s.ema_decay < 1.0):
        raise ValueError(f"--ema_decay={s.ema_decay!r}: must be in [0, 1)")
    batch = int(s.batch_size or config["train"]["batch_size"])
    resolved = {"teacher": teacher, "teacher_steps": int(s.teacher_steps), "target_steps": int(s.target_steps),
                "steps_per_stage": int(s.steps_per_stage), "student_param": s.student_param,
                "learning_rate": float(s.learning_rate), "lr_schedule": s.lr_schedule, "batch_size": batch,
                "ema_decay": float(s.ema_decay), "seed": int(s.seed)}
    if os.path.exists(workdir):
        if not os.path.isdir(workdir):
            raise ValueError(f"--workdir {workdir} exists and is not a directory")
        path = os.path.join(workdir, SETTINGS_FILE)
        if os.path.exists(path):
            saved = _read_json(path)
            saved = {**SAVED_DEFAULTS, **saved}
            diffs = [k for k in MUST_MATCH if saved.get(k) != resolved[k]]
            if diffs:
                k = diffs[0]
                raise ValueError(f"{workdir} holds a distillation with --{k}={saved.get(k)!r}, but this one has "
                                 f"--{k}={resolved[k]!r}; use a new --workdir (or the same settings) — nothing was changed")
        elif [n for n in os.listdir(workdir) if n != "train.lock"]:
            raise ValueError(f"--workdir {workdir} is not empty and holds no distillation: give a new or empty directory")
    return {"config": config, "T": T, "sizes": dist.stage_sizes(s.teacher_steps, s.target_steps),
            "settings": resolved, "teacher": teacher, "workdir": workdir}


def distilled_config(teacher_config: Dict[str, Any], settings: Dict[str, Any], num_steps: int, *,
                     teacher_rel: str, teacher_step: int) -> Dict[str, Any]:
    """The config of the stage whose student takes ``num_steps`` steps: the teacher's, with the
    student's objective (parameterisation), the distillation's optimiser, batch and EMA, and the
    sampler it is distilled for (DDIM, η = 0, ``num_steps`` steps, no clipping; the recorded
    ``sampling.distilled_steps`` makes ``experiments.sample`` refuse other step counts), plus a
    ``distillation`` section naming the teacher."""
    cfg = copy.deepcopy(teacher_config)
    cfg["objective"]["name"] = settings["student_param"]
    anneal = settings["steps_per_stage"] if settings["lr_schedule"] == "linear" else 0
    cfg["optim"].update(learning_rate=settings["learning_rate"], warmup_steps=0, decay_every_epochs=0, anneal_steps=anneal)
    cfg["train"].update(batch_size=settings["batch_size"], num_steps=settings["steps_per_stage"],
                        ema_decay=settings["ema_decay"], ema="constant", ema_snapshot_sigma_rels=[], t_sampling="uniform",
                        grad_accum_steps=1)
    cfg["sampling"].update(method="ddim", num_steps=num_steps, eta=0.0, grid="", clip_x0=False, distilled_steps=num_steps)
    cfg["distillation"] = {"teacher": teacher_rel, "teacher_step": teacher_step,
                           "first_teacher_steps": settings["teacher_steps"], "teacher_steps": 2 * num_steps,
                           "steps": num_steps, "student_param": settings["student_param"], "loss": "truncated_snr"}
    return cfg


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


class _Placement:
    """Batches padded to a multiple of the mesh's devices (zero-weight examples) and sharded over
    it; everything else replicated. One process (``jax.process_count() == 1``)."""

    def __init__(self):
        self.mesh = sharding.make_mesh()
        self.num_devices = self.mesh.devices.size
        self.replicated = NamedSharding(self.mesh, P())

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def padded(self, batch: int) -> int:
        return padded_size(batch, self.num_devices)

    def batch(self, images: np.ndarray):
        b = images.shape[0]
        pad = self.padded(b) - b
        tree = {"image": np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else images,
                "example_id": np.arange(b + pad, dtype=np.int32),
                "weight": np.concatenate([np.full(b, 1.0 / b), np.zeros(pad)]).astype(np.float32)}
        return sharding.shard_batch(tree, self.mesh)


def _fresh_student(teacher_params, tx, key):
    return create_train_state(jax.tree_util.tree_map(jnp.copy, teacher_params), tx, key)


def distill(s: Settings, *, progress: bool = True) -> Dict[str, Any]:
    """Runs (or resumes) the distillation of ``s`` (module docstring). Returns a summary:
    'stages' (the rows of ``distill.json``), 'stopped_by' ('SIGINT' | 'SIGTERM' | None), 'workdir'.

    Raises ValueError / FileNotFoundError / CheckpointError (bad input, one line; nothing written
    when raised before the workdir is locked), ``ddpm_jax.trainer.NonFiniteError``, OSError."""
    plan = check_settings(s)
    workdir = prepare_workdir(plan["workdir"])
    lock = lock_workdir(workdir)
    try:
        return _distill(s, plan, workdir, progress)
    finally:
        if lock is not None:
            lock.release()


def _restore(ckpt, fresh, workdir: str):
    """(tree, meta) of the newest checkpoint that restores (damaged newer ones moved aside), or
    (fresh, {}) when there is none."""
    if not ckpt.all_steps():
        return fresh, {}
    tree, meta, step, failed = ckpt.restore_newest(fresh)
    for bad in sorted(failed):
        dest = set_aside(workdir, ckpt.directory, bad, "damaged")
        _log(f"checkpoint {bad} cannot be restored ({failed[bad]}): moved to {dest}")
    if failed:
        ckpt.reload()
    _log(f"resumed from {ckpt.directory} at step {step} (stage of {meta['stage_steps']} steps, "
         f"step {meta['step_in_stage']} of {meta['steps_per_stage']})")
    return tree, meta


def _distill(s: Settings, plan: Dict[str, Any], workdir: str, progress: bool) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    t_command = time.time()
    settings = plan["settings"]
    S, B, sizes = settings["steps_per_stage"], settings["batch_size"], plan["sizes"]
    teacher = load_run(plan["teacher"])
    config = teacher.config
    teacher_rel = provenance.relative(plan["teacher"])
    splits = data.splits_from_config(config, source=s.data_source, path=s.data_path)
    if tuple(splits.image_shape) != tuple(teacher.image_shape):
        raise ConfigError(f"the data's images are {tuple(splits.image_shape)}, the teacher's network takes "
                          f"{tuple(teacher.image_shape)}: give the teacher's data (--data_path)")
    if splits.train.shape[0] < 1:
        raise ConfigError("no training images")
    write_json(os.path.join(workdir, SETTINGS_FILE), {**settings, "teacher": plan["teacher"]})

    schedule = teacher.schedule
    T = schedule.num_steps
    grids = dist.stage_grids(T, settings["teacher_steps"], settings["target_steps"])
    spe = data.steps_per_epoch(splits.train.shape[0], B)
    optim = distilled_config(config.to_dict(), settings, sizes[0], teacher_rel=teacher_rel, teacher_step=teacher.step)["optim"]
    tx = make_optimizer(ml_collections.ConfigDict(optim), steps_per_epoch=spe, params=teacher.ema_params)
    teacher_param = PREDICTS[config.objective.name]
    teacher_clip = data.data_range(config.data.scale) if config.sampling.get("clip_x0", False) else None
    place = _Placement()
    base_key = rng.run_keys(settings["seed"])[1]
    _log(f"teacher {teacher_rel} (step {teacher.step}, predicts {teacher_param}, T = {T}"
         f"{', x̂ clipped' if teacher_clip else ''}); stages {' -> '.join(str(n) for n in [settings['teacher_steps']] + sizes)}"
         f" steps, {S} steps each, batch {B} on {place.num_devices} {jax.devices()[0].platform} device(s)"
         + (f" (padded to {place.padded(B)})" if place.padded(B) != B else ""))

    ckpt_dir = os.path.join(workdir, "checkpoints")
    for path in remove_partial_checkpoints(ckpt_dir):
        _log(f"removed {path}: an unfinished save of an interrupted run")
    ckpt = Checkpointer(ckpt_dir, every_steps=s.checkpoint_every_steps, keep=2)
    fresh = place.replicate({"student": _fresh_student(teacher.ema_params, tx, jax.random.fold_in(base_key, sizes[0])),
                             "teacher": teacher.ema_params})
    tree, meta = _restore(ckpt, fresh, workdir)
    k = int(meta.get("stage", 0))
    step = int(meta.get("step_in_stage", 0))
    stage_wall = float(meta.get("stage_wall_seconds", 0.0))
    rows: List[Dict[str, Any]] = list(meta.get("stages_done", []))
    state, teacher_params = tree["student"], tree["teacher"]
    if k >= len(sizes) or (k == len(sizes) - 1 and step == S and any(r["steps"] == sizes[-1] for r in rows)
                           and os.path.isfile(os.path.join(workdir, stage_dir_name(sizes[-1]), "config.json"))):
        ckpt.close()
        _log(f"{workdir} is already complete: every stage down to {sizes[-1]} steps is written ({REPORT_FILE}); "
             "nothing to do")
        return {"stages": rows, "stopped_by": "complete", "workdir": workdir}
    schedule_d = place.replicate(schedule)
    writer = MetricWriter(workdir, tensorboard=False)
    writer.resume_at(k * S + step)
    iterator = data.BatchIterator(splits.train, B, seed=settings["seed"], random_flip=config.data.get("random_flip", False))
    window = platform_profile.dispatch_window()
    stopped_by = None
    t_stage = time.time()

    def ckpt_meta():
        return {"stage": k, "stage_steps": sizes[k], "step_in_stage": step, "steps_per_stage": S,
                "global_step": k * S + step, "stage_wall_seconds": round(stage_wall + time.time() - t_stage, 3),
                "stages_done": rows, "image_shape": list(teacher.image_shape), "num_devices": place.num_devices}

    def save(force=False):
        g = k * S + step
        if ckpt.latest_step() == g:
            return
        ckpt.save(g, {"student": state, "teacher": teacher_params}, ckpt_meta(), force=force)

    try:
        with StopSignals() as stop:
            while k < len(sizes):
                N = sizes[k]
                first = k == 0
                cfg = dist.DistillStepConfig(apply_fn=teacher.model.apply, tx=tx, ema_decay=settings["ema_decay"],
                                             student_param=settings["student_param"],
                                             teacher_param=teacher_param if first else settings["student_param"],
                                             teacher_clip_x0=teacher_clip if first else None,
                                             time_input=config.model.time_input)
                stage = place.replicate(dist.stage_steps(grids[2 * N]))
                step_fn = jax.jit(functools.partial(dist.distill_step, cfg), donate_argnums=(0,),
                                  out_shardings=(place.replicated, place.replicated))
                bar = tqdm(total=S, initial=step, unit="step", dynamic_ncols=True, disable=not progress, file=sys.stderr,
                           desc=f"stage {k + 1}/{len(sizes)}: {2 * N} -> {N} steps")
                pending, bad_streak, t_log, n_log = [], 0, time.time(), 0
                last_loss = math.nan
                while step < S:
                    batch = place.batch(iterator.batch(k * S + step))
                    state, metrics = step_fn(state, teacher_params, schedule_d, stage, batch)
                    window.add(metrics["loss"])
                    pending.append(metrics)
                    step += 1
                    n_log += 1
                    bar.update(1)
                    stopped_by = stop.requested(step)
                    if step % s.log_every_steps == 0 or step == S or stopped_by:
                        fetched, pending = jax.device_get(pending), []
                        good = [m for m in fetched if m["finite"]]
                        for m in fetched:
                            bad_streak = 0 if m["finite"] else bad_streak + 1
                        if bad_streak >= s.max_nonfinite_steps:
                            raise NonFiniteError(
                                f"stage {N} steps, step {step}: {bad_streak} steps in a row had a NaN/Inf loss or gradient; "
                                f"their updates were skipped and the last checkpoint ({ckpt.latest_step()}) is intact. "
                                "Lower --learning_rate")
                        last_loss = float(np.mean([m["loss"] for m in good])) if good else math.nan
                        dt = time.time() - t_log
                        writer.write(k * S + step, {"distill/loss": last_loss, "distill/stage_steps": N,
                                                    "distill/step_in_stage": step,
                                                    "distill/grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else math.nan,
                                                    "distill/images_per_sec": n_log * B / dt if dt > 0 else math.nan,
                                                    "distill/nonfinite_steps": len(fetched) - len(good)})
                        bar.set_postfix(loss=f"{last_loss:.4g}")
                        t_log, n_log = time.time(), 0
                    if (k * S + step) % s.checkpoint_every_steps == 0 and step < S:
                        save()
                    if stopped_by:
                        break
                bar.close()
                if stopped_by and step < S:
                    break
                stage_wall += time.time() - t_stage
                t_stage = time.time()  # the stage's writes below count in its checkpoint's meta, not in its row
                row = _stage_row(settings, N, grids, S, B, round(stage_wall, 3), teacher_rel,
                                 provenance.relative(os.path.join(workdir, stage_dir_name(N))), last_loss, k)
                path = os.path.join(workdir, stage_dir_name(N))
                if not os.path.isfile(os.path.join(path, "config.json")):
                    cfg_dict = distilled_config(config.to_dict(), settings, N, teacher_rel=teacher_rel,
                                                teacher_step=teacher.step)
                    run_meta = {"step": S, "epoch": S // spe, "step_in_epoch": S % spe, "steps_per_epoch": spe,
                                "image_shape": list(teacher.image_shape), "wall_seconds": row["wall_seconds"],
                                "distillation": row}
                    write_run(path, cfg_dict, state, run_meta)
                if all(r["steps"] != N for r in rows):
                    rows.append(row)
                row = next(r for r in rows if r["steps"] == N)  # a resumed stage keeps its record
                save(force=True)
                _write_report(workdir, settings, teacher_rel, teacher, rows)
                _log(f"stage {k + 1}/{len(sizes)}: {N}-step student in {row['wall_seconds']:.0f}s, loss {row['final_loss'] or math.nan:.4g} "
                     f"-> {path}")
                if k + 1 == len(sizes):
                    k += 1
                    break
                # the next stage: this student's EMA teaches, and a copy of it learns
                teacher_params = state.ema_params
                k, step, stage_wall, t_stage = k + 1, 0, 0.0, time.time()
                state = place.replicate(_fresh_student(teacher_params, tx, jax.random.fold_in(base_key, sizes[k])))
                if stopped_by:
                    break
    finally:
        if stopped_by and k < len(sizes) and 0 < step:
            save(force=True)
        ckpt.close()
        writer.close()
        _append_provenance(workdir, k, step, stopped_by, time.time() - t_command)
    if stopped_by and k < len(sizes):
        _log(f"stopped by {stopped_by} at stage {sizes[k]} steps, step {step}: checkpoint saved in {ckpt_dir}; "
             "run the same command to resume")
    else:
        _log(f"done: {len(rows)} stage(s) -> {os.path.join(workdir, REPORT_FILE)}; sample with: python -m experiments.sample "
             f"--workdir {provenance.relative(os.path.join(workdir, stage_dir_name(sizes[-1])))}")
    return {"stages": rows, "stopped_by": stopped_by if k < len(sizes) else None, "workdir": workdir}


def _stage_row(settings, N, grids, S, B, wall, teacher_rel, run_rel, loss, k) -> Dict[str, Any]:
    """One stage's record (``distill.json`` and the stage run's checkpoint metadata)."""
    images = S * B
    return {"stage": k + 1, "steps": N, "teacher_steps": 2 * N, "teacher": teacher_rel if k == 0 else f"stage_{2 * N}steps",
            "grid": [int(v) for v in grids[N]], "teacher_grid": [int(v) for v in grids[2 * N]],
            "train_steps": S, "batch_size": B, "images": images,
            "teacher_forward_passes": dist.FORWARDS_PER_IMAGE["teacher"] * images,
            "student_forward_equivalents": dist.FORWARDS_PER_IMAGE["student"] * images,
            "forward_equivalents": sum(dist.FORWARDS_PER_IMAGE.values()) * images,
            "sample_network_evaluations": N, "final_loss": loss if math.isfinite(loss) else None,
            "wall_seconds": wall, "run": run_rel}


def _write_report(workdir, settings, teacher_rel, teacher, rows) -> None:
    teacher_train = None
    tb = teacher.config.train.batch_size
    if teacher.step:
        teacher_train = {"steps": teacher.step, "batch_size": tb, "forward_equivalents": 3 * teacher.step * tb,
                         "wall_seconds": teacher.meta.get("wall_seconds")}
    report = {"teacher": teacher_rel, "teacher_step": teacher.step,
              "settings": {**settings, "teacher": teacher_rel},
              "accounting": "per training image and step: teacher 2 forward passes (two DDIM steps), student forward + "
                            "backward counted as 3 forward passes; padding examples not counted",
              "stages": rows,
              "total": {"forward_equivalents": sum(r["forward_equivalents"] for r in rows),
                        "wall_seconds": round(sum(r["wall_seconds"] for r in rows), 3)},
              "teacher_training": teacher_train, "provenance": provenance.record()}
    write_json(os.path.join(workdir, REPORT_FILE), report)


def _append_provenance(workdir, k, step, stopped_by, wall) -> None:
    row = {"stage_index": k, "step_in_stage": step, "stopped_by": stopped_by, **provenance.record(wall_s=wall)}
    try:
        with open(os.path.join(workdir, "provenance.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        _log(f"warning: could not append to provenance.jsonl: {e}")
