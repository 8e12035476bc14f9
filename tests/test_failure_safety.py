"""Failure safety: the NaN/Inf guard, pre-emption (SIGTERM / SIGINT / SIGKILL mid-save),
multi-host training with ``jax.distributed``, and a table of hostile inputs.

Runs use 8x8 images and T = 20 so each takes seconds; the multi-process tests start real
processes (``experiments.train``) the way a cluster would.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np
import pytest

from ddpm_jax import data
from ddpm_jax.checkpointing import CheckpointError
from ddpm_jax.config import ConfigError
from ddpm_jax.runs import load_run
from ddpm_jax.trainer import NonFiniteError, train_and_evaluate
from helpers import REPO, STD_NAMES, cli_args, cpu_env, make_digits_like, tiny_config, write_dir

ARRAYS = {k: (v[..., None] if k.endswith("images") else v.astype(np.int32)) for k, v in make_digits_like().items()}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _tree_digest(directory) -> dict:
    """{relative path: sha256} of every file under ``directory`` (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            if f == "train.lock":  # the lock file records its last holder; not a result
                continue
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------
# NaN / Inf guard
# ------------------------------------------------------------------------------------------------


def _poison(monkeypatch, bad_steps):
    """Batches at the steps in ``bad_steps`` (a set, or a predicate) become NaN images."""
    original = data.BatchIterator.batch
    is_bad = bad_steps if callable(bad_steps) else bad_steps.__contains__

    def batch(self, step):
        b = original(self, step)
        return np.full_like(b, np.nan) if is_bad(step) else b

    monkeypatch.setattr(data.BatchIterator, "batch", batch)


def test_a_poisoned_batch_is_skipped_and_counted(tmp_path, monkeypatch):
    """One NaN batch (step index 2) in an 8-step run: that update is skipped (the step-level test
    below proves it changes nothing), the run goes on to the end with finite params, and the
    metrics count the skipped step."""
    _poison(monkeypatch, {2})
    config = tiny_config("eps", **{"train.num_steps": 8, "train.log_every_steps": 1, "checkpoint.every_steps": 100})
    out = train_and_evaluate(config, str(tmp_path / "run"), arrays=ARRAYS, progress=False)
    assert out["step"] == 8 and out["stopped_by"] is None and np.isfinite(out["train_loss"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    counts = {r["step"]: r["train/nonfinite_steps"] for r in rows if "train/nonfinite_steps" in r}
    assert counts[2] == 0 and counts[3] == 1 and counts[8] == 1
    run = load_run(str(tmp_path / "run"))
    assert all(np.all(np.isfinite(x)) for x in _leaves(run.params) + _leaves(run.ema_params))


def test_train_step_skips_a_nonfinite_update_exactly():
    """At the step level: a NaN batch leaves params, optimiser state and EMA bit-identical and
    advances only the step; a finite batch after it updates as usual."""
    from test_train import _setup

    config = tiny_config("eps")
    par, state, schedule, splits = _setup(config)
    before = jax.device_get(state)
    batch = splits.train[:16]
    st = par.put_state(state)
    st, m = par.train(st, schedule, par.put_batch(np.full_like(batch, np.nan)))
    after = jax.device_get(par.get_state(st))
    assert float(m["finite"]) == 0.0 and int(after.step) == 1
    for a, b in zip(_leaves((before.params, before.opt_state, before.ema_params)), _leaves((after.params, after.opt_state, after.ema_params))):
        np.testing.assert_array_equal(a, b)
    st, m = par.train(st, schedule, par.put_batch(batch))
    moved = jax.device_get(par.get_state(st))
    assert float(m["finite"]) == 1.0 and int(moved.step) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(after.params), _leaves(moved.params)))


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    """From step index 3 on every batch is NaN; with max_nonfinite_steps = 3 the run stops at
    step 6 with a NonFiniteError, writes no new checkpoint, and the step-3 checkpoint is intact."""
    _poison(monkeypatch, lambda step: step >= 3)
    config = tiny_config("eps", **{"train.num_steps": 30, "train.log_every_steps": 1, "checkpoint.every_steps": 3,
                                   "train.max_nonfinite_steps": 3})
    work = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        train_and_evaluate(config, str(work), arrays=ARRAYS, progress=False)
    msg = str(e.value)
    assert "3 steps in a row had a NaN/Inf loss or gradient" in msg and "train.max_nonfinite_steps=3" in msg
    assert "last checkpoint (step 3) is intact" in msg and "\n" not in msg
    assert sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()) == [3]
    run = load_run(str(work))
    assert run.step == 3 and all(np.all(np.isfinite(x)) for x in _leaves(run.params))


# ------------------------------------------------------------------------------------------------
# Pre-emption
# ------------------------------------------------------------------------------------------------


def _cli_args(idx_dir, workdir, steps, every=3):
    """A tiny run logging every step, checkpointing every ``every`` steps, with no per-epoch
    evaluation or sample grids (the tests time signals against steps)."""
    return cli_args(idx_dir, workdir, steps, train__log_every_steps=1, checkpoint__every_steps=every,
                    train__sample_every_epochs=0, train__eval_every_epochs=0)


def _env(devices=None):
    return cpu_env(devices, PYTHONUNBUFFERED="1")


def _train(args, **kw):
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=600, **kw)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("idx"), make_digits_like(), STD_NAMES, ".gz")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_and_exit_cleanly_then_resume(tmp_path, idx_dir, sig):
    """The signal stops the loop after the current step, a checkpoint of that step is saved, the
    process exits 0; the same command resumes from that step."""
    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *_cli_args(idx_dir, work, 100_000, every=100_000)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (work / "metrics.jsonl").exists(), "training never started"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in out
    steps = [int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 100_000
    resumed = _train(_cli_args(idx_dir, work, steps[0] + 2, every=100_000))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {steps[0]}" in resumed.stdout and f"done: step {steps[0] + 2}" in resumed.stdout


KILL_IN_SAVE = textwrap.dedent(
    """
    # experiments.train, but the process SIGKILLs itself while the asynchronous save of step
    # {kill_step} is in flight (right after Orbax has started it, before it can finish).
    import os, runpy, signal, sys
    sys.path.insert(0, {repo!r})
    from ddpm_jax import checkpointing

    original = checkpointing.Checkpointer.save

    def save(self, step, state, meta, *, force=False):
        started = original(self, step, state, meta, force=force)
        if started and int(step) == {kill_step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpointing.Checkpointer.save = save
    sys.argv = ["experiments.train"] + sys.argv[1:]
    runpy.run_module("experiments.train", run_name="__main__")
    """
)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint_bit_for_bit(tmp_path, idx_dir):
    """Checkpoints every 3 steps; the process is SIGKILLed while saving step 6. The rerun restores
    the newest *complete* checkpoint (3, or 6 if the write happened to finish), never a partial
    one, and after 9 steps its state equals a run that was never interrupted, bit for bit."""
    script = tmp_path / "kill_in_save.py"
    script.write_text(KILL_IN_SAVE.format(repo=REPO, kill_step=6))
    work = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(script), *_cli_args(idx_dir, work, 9)], cwd=REPO, capture_output=True,
                            text=True, env=_env(), timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = os.listdir(work / "checkpoints")
    partial = [n for n in left if not n.isdigit()]  # e.g. '6.orbax-checkpoint-tmp', what the kill interrupted
    resumed = _train(_cli_args(idx_dir, work, 9))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restored_from = int(resumed.stdout.split("resumed from", 1)[1].split("at step", 1)[1].split()[0])
    assert restored_from == (3 if partial else 6), (left, restored_from)
    assert "done: step 9" in resumed.stdout
    straight = _train(_cli_args(idx_dir, tmp_path / "straight", 9))
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_run(str(work)), load_run(str(tmp_path / "straight"))
    assert a.step == b.step == 9
    for x, y in zip(_leaves((a.params, a.ema_params)), _leaves((b.params, b.ema_params))):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# Multi-host
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir, key="train/loss"):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if key in r}


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, idx_dir):
    """2 processes x 2 CPU devices (jax.distributed, gloo collectives) against 1 process x 4
    devices on the same global batches of 16: each process feeds its half of every batch.
    Per-example keys make the noise identical, so only the order of float32 sums differs (the
    cross-process all-reduce): the loss at every step agrees to 1e-5 relative (float32 eps 1.2e-7
    times the ~100 terms of the reduction, with room for three Adam steps of drift), and only
    process 0 writes metrics, while both write the shared checkpoint collectively."""
    steps = 6
    flags = dict(train__log_every_steps=1, train__sample_every_epochs=0, train__eval_every_epochs=1)
    args = cli_args(idx_dir, tmp_path / "multi", steps, **flags)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(2))
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "devices: 4 x cpu (jit), 2 process(es)" in outs[0] and "done: step 6" in outs[0]
    assert "done: step" not in outs[1]  # only process 0 prints and writes
    single = subprocess.run([sys.executable, "-m", "experiments.train", *cli_args(idx_dir, tmp_path / "single", steps, **flags)],
                            cwd=REPO, capture_output=True, text=True,
                            env=_env(4), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "devices: 4 x cpu (jit), 1 process(es)" in single.stdout
    multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
    assert sorted(multi) == sorted(one) == list(range(1, steps + 1))
    for s in one:
        assert multi[s] == pytest.approx(one[s], rel=1e-5), (s, multi[s], one[s])
    # the validation loss, each process evaluating its slice of every batch (epochs end at 3 and 6)
    val_multi, val_one = _losses(tmp_path / "multi", "val/loss"), _losses(tmp_path / "single", "val/loss")
    assert sorted(val_multi) == sorted(val_one) == [3, 6]
    for s in val_one:
        assert val_multi[s] == pytest.approx(val_one[s], rel=1e-5), (s, val_multi[s], val_one[s])
    assert load_run(str(tmp_path / "multi")).step == steps


def _two_processes(args, port):
    return [subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"--coordinator_address=127.0.0.1:{port}",
                              "--num_processes=2", f"--process_id={i}", "--cpu_devices=1"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
            for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_bit_for_bit(tmp_path, idx_dir):
    """Pre-emption across hosts: SIGTERM to process 1 alone of a 2-process run. JAX's pre-emption
    service tells process 0, both stop after the same step and save one complete checkpoint
    together, and both exit 0. Rerun to 3 steps past it, the run equals an uninterrupted 2-process
    run of as many steps, bit for bit (same processes, same reduction order)."""
    work = tmp_path / "preempted"
    procs = _two_processes(_cli_args(idx_dir, work, 100_000, every=100_000), _free_port())
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    stop = int(outs[0].split("stopped by SIGTERM at step", 1)[1].split(":")[0])
    assert sorted(int(n) for n in os.listdir(work / "checkpoints")) == [stop]  # one complete checkpoint, no partial one
    resumed = _two_processes(_cli_args(idx_dir, work, stop + 3, every=100_000), _free_port())
    straight = tmp_path / "straight"
    outs = [p.communicate(timeout=300)[0] for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], [o[-3000:] for o in outs]
    assert f"resumed from {work / 'checkpoints'} at step {stop}" in outs[0] and f"done: step {stop + 3}" in outs[0]
    ref = _two_processes(_cli_args(idx_dir, straight, stop + 3, every=100_000), _free_port())
    outs = [p.communicate(timeout=300)[0] for p in ref]
    assert [p.returncode for p in ref] == [0, 0], [o[-3000:] for o in outs]
    a, b = load_run(str(work)), load_run(str(straight))
    assert a.step == b.step == stop + 3
    for x, y in zip(_leaves((a.params, a.ema_params)), _leaves((b.params, b.ema_params))):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# Hostile inputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 3-step run whose checkpoints and outputs must survive every bad input."""
    work = tmp_path_factory.mktemp("finished") / "run"
    train_and_evaluate(tiny_config("eps", **{"train.num_steps": 3}), str(work), arrays=ARRAYS, progress=False)
    return work


def _truncated_idx(tmp):
    d = write_dir(os.path.join(tmp, "idx"), make_digits_like(), STD_NAMES, "")
    path = os.path.join(d, STD_NAMES["train_images"])
    payload = open(path, "rb").read()
    open(path, "wb").write(payload[: len(payload) // 2])
    return d


# (case, config overrides, how to prepare the inputs, exception type, fragment of the message)
HOSTILE = [
    ("beta <= 0", {"schedule.beta_start": 0.0}, None, ConfigError, "beta_1 = 0.0"),
    ("beta >= 1", {"schedule.beta_end": 1.0}, None, ConfigError, "every beta_t must be in (0, 1)"),
    ("T = 0", {"schedule.num_steps": 0}, None, ConfigError, "config.schedule.num_steps = 0"),
    ("unknown schedule", {"schedule.name": "sigmoid"}, None, ConfigError, "unknown schedule 'sigmoid'"),
    ("unknown objective", {"objective.name": "score"}, None, ConfigError, "config.objective.name = 'score'"),
    ("unknown sampler", {"sampling.method": "euler"}, None, ConfigError, "config.sampling.method = 'euler'"),
    ("more micro-batches than examples", {"train.grad_accum_steps": 17}, None, ConfigError, "config.train.grad_accum_steps = 17: must be <= 16"),
    ("unknown compute dtype", {"model.dtype": "float16"}, None, ConfigError, "config.model.dtype = 'float16'"),
    ("image too small for the U-Net", {}, "tiny_images", ValueError, "ScoreNet"),
    ("missing IDX directory", {"data.source": "idx", "data.path": "/nonexistent/mnist"}, None, FileNotFoundError, "/nonexistent/mnist"),
    ("truncated IDX file", {"data.source": "idx"}, "truncated_idx", ValueError, "train-images-idx3-ubyte"),
    ("checkpoint of another model (config)", {"model.preset": "medium"}, "same_workdir", ConfigError, "config.model.preset = 'small'"),
    ("checkpoint of another model (shapes)", {"model.preset": "medium"}, "same_workdir_no_config", CheckpointError, "different model"),
    ("workdir is a file", {}, "workdir_file", ConfigError, "exists and is not a directory"),
    ("read-only workdir", {}, "read_only", ConfigError, "is not writable"),
]


@pytest.mark.parametrize("case,overrides,prepare,exc,fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_one_line_before_training_and_touches_nothing(tmp_path, monkeypatch, finished_run,
                                                                       case, overrides, prepare, exc, fragment):
    arrays = ARRAYS
    config = tiny_config("eps", **{"train.num_steps": 6, **overrides})
    work = tmp_path / "run"
    if prepare in ("same_workdir", "same_workdir_no_config"):
        shutil.copytree(finished_run, work)
        if prepare == "same_workdir_no_config":  # without config.json only the array shapes can tell
            os.remove(work / "config.json")
    elif prepare == "tiny_images":
        arrays = {k: (v[:, :4, :4] if k.endswith("images") else v) for k, v in ARRAYS.items()}
    elif prepare == "truncated_idx":
        config.data.path = _truncated_idx(str(tmp_path))
    elif prepare == "workdir_file":
        work = tmp_path / "a_file"
        work.write_text("results, keep me")
    elif prepare == "read_only":
        shutil.copytree(finished_run, work)
        if os.geteuid() == 0:
            # root ignores file modes: make the write probe fail the way a read-only mount does
            def refuse(*a, **k):
                raise OSError(30, "Read-only file system")
            monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
        else:
            os.chmod(work, 0o555)
    before = _tree_digest(work) if work.is_dir() else (work.read_text() if work.exists() else None)

    with pytest.raises(exc) as e:
        train_and_evaluate(config, str(work), arrays=arrays, progress=False)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg, msg

    if isinstance(before, dict):
        os.chmod(work, 0o755)
        assert _tree_digest(work) == before  # existing checkpoints and results untouched
    elif before is not None:
        assert work.read_text() == before
    if prepare is None or prepare in ("tiny_images", "truncated_idx"):  # a fresh workdir
        assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()


def test_a_checkpoint_of_other_shapes_is_refused_before_any_array_is_read(tmp_path, monkeypatch):
    """Checkpointer.restore compares the saved array shapes (Orbax's metadata) with the target's
    first: another model's checkpoint raises CheckpointError without Orbax's restore starting (a
    restore that fails part-way leaves pending reads behind), and a matching one restores as before."""
    from ddpm_jax.checkpointing import Checkpointer

    writer = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2, async_save=False)
    state = {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4), "b": np.zeros(5, np.float32)}
    writer.save(1, state, {"note": "x"}, force=True)
    writer.close()
    # a new Checkpointer, as a resumed run has: it has neither saved nor restored anything yet
    ckpt = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2, async_save=False)
    manager_restore = ckpt._manager.restore
    calls = []
    monkeypatch.setattr(ckpt._manager, "restore", lambda *a, **k: calls.append(a) or manager_restore(*a, **k))
    other = {"w": np.zeros((4, 4), np.float32), "b": np.zeros(5, np.float32)}
    with pytest.raises(CheckpointError, match=r"different model.*new --workdir"):
        ckpt.restore(other, 1)
    assert calls == []  # refused from the metadata alone
    restored, meta = ckpt.restore(jax.tree_util.tree_map(np.zeros_like, state), 1)
    assert len(calls) == 1 and meta == {"note": "x"}
    np.testing.assert_array_equal(restored["w"], state["w"])
    ckpt.close()
