"""A run's files are safe: one trainer per workdir, outputs written whole or not at all, checkpoint
fall-back, a full disk, and evaluation inputs that cannot silently give wrong numbers.

Every case runs the real entry points (``experiments.train``, ``.sample``, ``.evaluate``) in
subprocesses on 8x8 images with T = 20, and checks the one ``error:`` line, the exit code and that
nothing earlier was lost.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from ddpm_jax import data
from ddpm_jax.runs import load_run
from helpers import REPO, STD_NAMES, cli_args, cpu_env, make_digits_like, write_dir

ENV = cpu_env(1, PYTHONUNBUFFERED="1")


def _run(module, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _args(idx_dir, workdir, steps, **overrides):
    """A tiny run: checkpoints every 3 steps (keep 5), no per-epoch grids or evaluation."""
    keys = dict(checkpoint__every_steps=3, checkpoint__keep=5, train__sample_every_epochs=0, train__eval_every_epochs=0,
                train__log_every_steps=1)
    keys.update(overrides)
    return cli_args(idx_dir, workdir, steps, **keys)


def _error_line(proc):
    """The one ``error:`` line of a failed entry point; nothing else on stderr looks like a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _digest(directory, skip=("train.lock",)):
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            if f not in skip:
                p = os.path.join(root, f)
                out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _leaves(run):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((run.params, run.ema_params))]


def _assert_same_state(a, b):
    a, b = load_run(str(a)), load_run(str(b))
    assert a.step == b.step
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


def _metric_steps(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("idx"), make_digits_like(), STD_NAMES, ".gz")


@pytest.fixture(scope="module")
def run9(tmp_path_factory, idx_dir):
    """A finished 9-step run (checkpoints 3, 6, 9) that tests copy before changing anything."""
    work = tmp_path_factory.mktemp("run9") / "run"
    proc = _run("experiments.train", *_args(idx_dir, work, 9))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


# ------------------------------------------------------------------------------------------------
# The workdir lock
# ------------------------------------------------------------------------------------------------


def test_a_second_trainer_is_refused_naming_the_holder_and_sample_and_evaluate_still_work(tmp_path, idx_dir):
    work = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "experiments.train", *_args(idx_dir, work, 10**6, checkpoint__every_steps=20)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.time() + 300
        ckpts = work / "checkpoints"
        while time.time() < deadline and first.poll() is None and not (ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts))):
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read()[-3000:]
        before = open(work / "config.json").read()

        # the same command again, and one with another objective: both refused, the run untouched
        for extra in ([], ["--config.objective.name=x0"]):
            second = _run("experiments.train", *_args(idx_dir, work, 10), *extra)
            assert second.returncode == 2
            line = _error_line(second)
            assert f"is in use by another trainer (pid {first.pid} on host" in line, line
        assert open(work / "config.json").read() == before

        # reading the run needs no lock
        sample = _run("experiments.sample", "--workdir", work, "--num", 8, "--batch_size", 8, "--out", tmp_path / "s")
        assert sample.returncode == 0, sample.stderr[-3000:]
        ev = _run("experiments.evaluate", "--workdir", work, "--num", 16, "--batch_size", 16, "--trajectory_samples", 0,
                  "--out", tmp_path / "eval.json", "--allow_out_of_range")
        assert ev.returncode == 0, ev.stderr[-3000:]
        assert json.load(open(tmp_path / "eval.json"))["num_samples"] == 16
        assert first.poll() is None  # the trainer ran on throughout
    finally:
        first.kill()  # SIGKILL: the OS drops the lock with the process
        first.communicate(timeout=60)

    # no stale lock after a SIGKILL: the next trainer resumes at once
    newest = max(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit())
    resumed = _run("experiments.train", *_args(idx_dir, work, newest + 1, checkpoint__every_steps=20))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"done: step {newest + 1}" in resumed.stdout


# ------------------------------------------------------------------------------------------------
# Samples: written whole, refused when they cannot be the run's
# ------------------------------------------------------------------------------------------------

KILL_IN_WRITE = textwrap.dedent(
    """
    # experiments.sample, but the process SIGKILLs itself half-way through writing samples.npz
    import os, runpy, signal, sys
    sys.path.insert(0, {repo!r})
    import numpy as np

    def savez_compressed(f, **arrays):
        f.write(b"PK\\x03\\x04" + b"\\0" * 4096)  # the start of an archive, then the kill
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    np.savez_compressed = savez_compressed
    sys.argv = ["experiments.sample"] + sys.argv[1:]
    runpy.run_module("experiments.sample", run_name="__main__")
    """
)


def test_an_interrupted_sampler_keeps_the_earlier_samples(tmp_path, run9):
    out = tmp_path / "samples"
    first = _run("experiments.sample", "--workdir", run9, "--num", 20, "--batch_size", 10, "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(out)
    assert set(before) == {"samples.npz", "grid.png"}

    script = tmp_path / "kill_in_write.py"
    script.write_text(KILL_IN_WRITE.format(repo=REPO))
    killed = subprocess.run([sys.executable, str(script), "--workdir", str(run9), "--num", "40", "--batch_size", "10",
                             "--seed", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    after = _digest(out)
    assert {k: after[k] for k in before} == before  # the earlier samples and grid, byte for byte
    assert [n for n in after if n not in before] == [n for n in os.listdir(out) if n.startswith(".samples.tmp-")]

    # the next sampler removes what the killed one left and writes the new file whole
    again = _run("experiments.sample", "--workdir", run9, "--num", 40, "--batch_size", 10, "--seed", 1, "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["grid.png", "samples.npz"]
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (40, 8, 8, 1) and str(z["scale"]) == "[0,1]"


def test_an_unwritable_output_is_refused_before_sampling(tmp_path, run9):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    proc = _run("experiments.sample", "--workdir", run9, "--num", 8, "--out", blocker / "sub")
    assert proc.returncode == 4
    line = _error_line(proc)
    assert str(blocker) in line and "not writable" in line, line
    assert "sampling" not in proc.stderr  # refused before the progress bar started
    assert blocker.read_text() == "keep me"


@pytest.fixture(scope="module")
def real_like(run9):
    """Real validation images of the run, in its data scale [0, 1]: samples that must be accepted."""
    run = load_run(str(run9))
    return np.asarray(data.splits_from_config(run.config).val[:16], np.float32)


def _bad_files(directory, x):
    """{case: path} of files that cannot be the run's samples, made from good samples ``x``."""
    d = str(directory)
    good = os.path.join(d, "good.npz")
    np.savez(good, samples=x, scale=np.asarray("[0,1]"))
    payload = open(good, "rb").read()
    flipped = bytearray(payload)
    flipped[len(payload) // 3] ^= 0xFF
    files = {
        "uint8 0..255": dict(samples=(x * 255).astype(np.uint8)),
        "float 0..255": dict(samples=x * 255),
        "[-1, 1] for a [0, 1] run": dict(samples=x * 2 - 1),
        "no channel axis": dict(samples=x[..., 0]),
        "NaN": dict(samples=np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x)),
        "Inf": dict(samples=np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x)),
        "wrong size": dict(samples=np.zeros((16, 10, 10, 1), np.float32)),
        "RGB": dict(samples=np.repeat(x, 3, -1)),
        "missing key": dict(images=x),
        "another scale recorded": dict(samples=x, scale=np.asarray("[-1,1]")),
    }
    paths = {}
    for name, arrays in files.items():
        paths[name] = os.path.join(d, name.replace(" ", "_").replace("/", "") + ".npz")
        np.savez(paths[name], **arrays)
    paths["text file"] = os.path.join(d, "text.npz")
    open(paths["text file"], "w").write("not samples\n")
    paths["truncated archive"] = os.path.join(d, "truncated.npz")
    open(paths["truncated archive"], "wb").write(payload[: len(payload) // 2])
    paths["flipped byte"] = os.path.join(d, "flipped.npz")
    open(paths["flipped byte"], "wb").write(bytes(flipped))
    paths["missing file"] = os.path.join(d, "nothing_here.npz")
    return good, paths


BAD_SAMPLES = {  # case: a fragment of its error line
    "uint8 0..255": "are uint8 (pixel values 0..255?)",
    "float 0..255": "are they in another scale (e.g. 0..255)?",
    "[-1, 1] for a [0, 1] run": "are they in another scale",
    "no channel axis": "add the channel axis",
    "NaN": "1 NaN/Inf values",
    "Inf": "1 NaN/Inf values",
    "wrong size": "have shape (16, 10, 10, 1); the run's images are (N,) + (8, 8, 1)",
    "RGB": "3 channels where the run's images have 1",
    "missing key": "has no 'samples' array (it has: images)",
    "another scale recorded": "saved in data scale [-1,1], but the run's data.scale is [0,1]",
    "text file": "is not a .npz archive",
    "truncated archive": "damaged (truncated) archive",
    "flipped byte": "fails its checksum",
    "missing file": "does not exist",
}


def test_evaluate_refuses_samples_that_cannot_be_the_runs_in_one_line_each(tmp_path, run9, real_like):
    good, paths = _bad_files(tmp_path, real_like)
    for case, fragment in BAD_SAMPLES.items():
        proc = _run("experiments.evaluate", "--workdir", run9, "--samples", paths[case], "--num", 16,
                    "--out", tmp_path / "report.json")
        assert proc.returncode == 2, (case, proc.stderr[-3000:])
        line = _error_line(proc)
        assert fragment in line and paths[case] in line, (case, line)
        assert not (tmp_path / "report.json").exists(), case

    # the real images themselves pass, and the report is written whole
    ok = _run("experiments.evaluate", "--workdir", run9, "--samples", good, "--num", 16, "--out", tmp_path / "report.json")
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    assert report["num_samples"] == 16
    assert [n for n in os.listdir(tmp_path) if n.startswith(".report")] == []
    # and samples out of range are evaluated as they are when asked
    forced = _run("experiments.evaluate", "--workdir", run9, "--samples", paths["float 0..255"], "--num", 16,
                  "--allow_out_of_range", "--out", tmp_path / "forced.json")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.load(open(tmp_path / "forced.json"))["fraction_outside_data_range"] > 0.05


# ------------------------------------------------------------------------------------------------
# Checkpoints: fall-back past a damaged one, --restore_step, a full disk
# ------------------------------------------------------------------------------------------------


def _damage(step_dir):
    """Halves the largest array file of a checkpoint, as a crash of the disk or a bad copy would."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    payload = open(biggest, "rb").read()
    open(biggest, "wb").write(payload[: len(payload) // 2])


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_bit_for_bit(tmp_path, idx_dir, run9):
    work = tmp_path / "run"
    shutil.copytree(run9, work)
    _damage(work / "checkpoints" / "9")
    damaged = _digest(work / "checkpoints" / "9")
    resumed = _run("experiments.train", *_args(idx_dir, work, 12))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    moved = work / "checkpoints_set_aside" / "9-damaged"
    assert "checkpoint step 9 cannot be restored" in resumed.stdout, resumed.stdout
    assert str(moved) in resumed.stdout and "resuming from step 6" in resumed.stdout, resumed.stdout
    assert _digest(moved) == damaged  # kept as it was, for a look
    assert _metric_steps(work) == list(range(1, 13))  # steps 7..9 once, from the resumed run

    straight = _run("experiments.train", *_args(idx_dir, tmp_path / "straight", 12))
    assert straight.returncode == 0, straight.stderr[-3000:]
    _assert_same_state(work, tmp_path / "straight")


def test_restore_step_resumes_from_the_chosen_checkpoint_and_sets_the_newer_aside(tmp_path, idx_dir, run9):
    work = tmp_path / "run"
    shutil.copytree(run9, work)
    proc = _run("experiments.train", *_args(idx_dir, work, 9), "--restore_step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 3" in proc.stdout and "done: step 9" in proc.stdout, proc.stdout
    assert sorted(os.listdir(work / "checkpoints_set_aside")) == ["6-after-step-3", "9-after-step-3"]
    assert "checkpoint step 6 is newer than --restore_step=3" in proc.stdout
    assert _metric_steps(work) == list(range(1, 10))
    _assert_same_state(work, run9)  # the same 6 steps again: the same state

    missing = _run("experiments.train", *_args(idx_dir, work, 9), "--restore_step=4")
    assert missing.returncode == 2
    assert "--restore_step=4" in _error_line(missing)


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, idx_dir):
    """A 5 MiB filesystem passes the trainer's free-space check (one state, ~2.5 MiB, + 1 MiB) and
    holds the first checkpoint but not many more: a save fails, the run exits 4 with one line, no
    partial directory is left, the newest complete checkpoint restores; the rerun is refused
    before any step for want of room."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "5m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        work = disk / "run"
        full = _run("experiments.train", *_args(idx_dir, work, 30))
        assert full.returncode == 4, (full.stdout[-2000:], full.stderr[-3000:])
        line = _error_line(full)
        assert "No space left on device" in line and str(work) in line, line
        others = [x for x in full.stderr.splitlines() if x.strip() and not x.startswith("train:")]  # not the progress bar
        assert others == [line], full.stderr  # the line is not buried
        left = os.listdir(work / "checkpoints")
        assert not [n for n in left if "tmp" in n], left
        steps = sorted(int(n) for n in left if n.isdigit())
        assert steps and load_run(str(work)).step == steps[-1]

        again = _run("experiments.train", *_args(idx_dir, work, 30))  # refused up front, before any step
        assert again.returncode == 4
        assert "free" in _error_line(again) and "train:" not in again.stderr
        assert sorted(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit()) == steps
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------------------------------------
# metrics.jsonl: a torn last line, and no repeated rows on resume
# ------------------------------------------------------------------------------------------------


def test_a_torn_metrics_line_is_tolerated_and_resumed_runs_do_not_repeat_rows(tmp_path, idx_dir, run9):
    work = tmp_path / "run"
    shutil.copytree(run9, work)
    # as if killed after writing step 9's metrics but before its checkpoint, mid-way through a line
    shutil.rmtree(work / "checkpoints" / "9")
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "train/lo')
    proc = _run("experiments.train", *_args(idx_dir, work, 12))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 6" in proc.stdout
    lines = open(work / "metrics.jsonl").read().splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole
    assert _metric_steps(work) == list(range(1, 13))
    assert all(r["step"] <= 12 for r in rows)


# ------------------------------------------------------------------------------------------------
# Config values and flags
# ------------------------------------------------------------------------------------------------

BAD_FLAGS = [  # (extra flags, exit code, fragment of the error line)
    (["--config.schedule.num_steps=1"], 2, "config.schedule.num_steps = 1"),
    (["--config.schedule.beta_start=0.1", "--config.schedule.beta_end=0.01"], 2, "beta_start"),
    (["--config.train.foo=1"], 2, "--config.train.foo"),
    (["--config.trian.batch_size=1"], 2, "trian"),
    (["--no_such_flag=1"], 2, "no_such_flag"),
]


@pytest.mark.parametrize("extra,code,fragment", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_bad_flags_and_values_are_one_line(tmp_path, idx_dir, extra, code, fragment):
    work = tmp_path / "run"
    proc = _run("experiments.train", *_args(idx_dir, work, 6), *extra)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert fragment in _error_line(proc)
    assert not (work / "checkpoints").exists()


def test_fewer_steps_than_the_latest_checkpoint_is_refused(tmp_path, idx_dir, run9):
    work = tmp_path / "run"
    shutil.copytree(run9, work)
    before = _digest(work)
    proc = _run("experiments.train", *_args(idx_dir, work, 5))
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "train.num_steps" in line and "9" in line, line
    assert _digest(work) == before


def test_the_cosine_schedule_can_be_chosen_from_the_command_line(tmp_path, idx_dir):
    """configs/mnist.py carries the linear schedule's beta_start/beta_end; the cosine schedule
    takes only its own keys from the section."""
    work = tmp_path / "run"
    proc = _run("experiments.train", *_args(idx_dir, work, 3), "--config.schedule.name=cosine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_run(str(work)).schedule.betas.shape == (21,)
