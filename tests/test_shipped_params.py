"""Trained params as a params run (ddpm_jax.run_writer.write_params_run, read by
ddpm_jax.runs.load_run), experiments.export_params, and the params the repository ships in
pretrained/: they load, sample, and score the classifier FID their check file documents."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, STD_NAMES, cpu_env, main_driver, make_digits_like, run_module, tiny_config, write_dir

#: The params runs the repository ships (experiments.export_params with --check_num).
SHIPPED = ("mnist_unet",)


def _tiny_params(config, image_shape=(8, 8, 1), seed=0):
    from ddpm_jax.models import model_from_config

    abstract = jax.eval_shape(model_from_config(config.model, image_shape).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, *image_shape)), jnp.ones((1,)))["params"]
    noise = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: noise.normal(size=a.shape).astype(np.float32), abstract)


def _assert_same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_params_run_round_trip_samples_and_refuses_what_does_not_fit(tmp_path):
    from ddpm_jax.checkpointing import CheckpointError, CheckpointMismatchError
    from ddpm_jax.run_writer import RunExistsError, write_params_run
    from ddpm_jax.runs import load_run

    config = tiny_config("eps")
    params = _tiny_params(config)
    meta = {"step": 30, "steps_per_epoch": 3, "image_shape": [8, 8, 1], "wall_seconds": 1.5}
    path = write_params_run(str(tmp_path / "p"), config.to_dict(), params, meta)
    assert sorted(os.listdir(path)) == ["config.json", "meta.json", "params.msgpack"]
    run = load_run(path)
    _assert_same(run.params, params)
    _assert_same(run.ema_params, params)
    assert run.step == 30 and run.image_shape == (8, 8, 1) and run.meta["wall_seconds"] == 1.5
    assert load_run(path, 30).step == 30
    x = run.make_sampler(4, run.sampler_options())(jax.random.PRNGKey(0))
    assert x.shape == (4, 8, 8, 1) and bool(jnp.all(jnp.isfinite(x)))

    with pytest.raises(FileNotFoundError, match="step 30 only"):
        load_run(path, 29)
    with pytest.raises(RunExistsError, match="not empty"):
        write_params_run(path, config.to_dict(), params, meta)
    with pytest.raises(ValueError, match="image_shape"):
        write_params_run(str(tmp_path / "q"), config.to_dict(), params, {"step": 1, "steps_per_epoch": 1})
    assert not os.path.exists(tmp_path / "q")
    other = _tiny_params(config, seed=1)
    write_params_run(path, config.to_dict(), other, meta, overwrite=True)
    _assert_same(load_run(path).params, other)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary directory left

    wide = tiny_config("eps")
    wide.model.embed_dim = 128  # another network: the time embedding's Dense layers change shape
    mismatched = write_params_run(str(tmp_path / "m"), wide.to_dict(), params, meta)
    with pytest.raises(CheckpointMismatchError, match="params.msgpack does not hold this config's model"):
        load_run(mismatched)
    with open(os.path.join(path, "params.msgpack"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="params.msgpack cannot be read"):
        load_run(path)
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_run(path)


DRIVER = main_driver("export_params")


def test_export_params_command_writes_the_ema_params_and_refuses_bad_input(tmp_path):
    from ddpm_jax import data, rng
    from ddpm_jax.run_writer import write_run
    from ddpm_jax.runs import load_run
    from ddpm_jax.train_state import create_train_state, make_optimizer

    config = tiny_config("eps")
    config.data.source, config.data.path = "idx", str(tmp_path / "mnist")  # a path of this machine
    params, ema_params = _tiny_params(config, seed=0), _tiny_params(config, seed=1)
    spe = data.steps_per_epoch(config.data.train_size, config.train.batch_size)
    tx = make_optimizer(config.optim, steps_per_epoch=spe, params=params)
    state = create_train_state(params, tx, rng.run_keys(config.seed)[1])
    state = state.replace(step=jnp.asarray(6, jnp.int32), ema_params=ema_params)
    work = write_run(str(tmp_path / "run"), config.to_dict(), state,
                     {"step": 6, "epoch": 2, "steps_per_epoch": spe, "image_shape": [8, 8, 1], "wall_seconds": 3.0})

    out = tmp_path / "shipped"
    proc = run_module("experiments.export_params", "--workdir", work, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMA params of step 6" in proc.stdout
    shipped = load_run(str(out))
    _assert_same(shipped.params, ema_params)  # the EMA params, not the raw ones
    assert shipped.step == 6 and shipped.meta["wall_seconds"] == 3.0
    exported = shipped.meta["exported_from"]
    assert exported["params"] == "ema" and exported["step"] == 6 and not os.path.isabs(exported["workdir"])
    assert shipped.meta["provenance"]["command"].startswith("python -m experiments.export_params")
    assert (shipped.config.data.source, shipped.config.data.path) == ("auto", "")  # no path of this machine
    assert exported["data"] == {"source": "idx", "path": os.path.relpath(tmp_path / "mnist", REPO)}

    # experiments.score_checkpoints reads the params run as a run of one checkpoint
    idx_dir = write_dir(tmp_path / "idx", make_digits_like(), STD_NAMES, ".gz")
    scored = run_module("experiments.score_checkpoints", "--workdir", out, "--num", 8, "--batch_size", 8,
                        "--data_source", "idx", "--data_path", idx_dir, "--out_dir", tmp_path / "eval")
    assert scored.returncode == 0, scored.stderr[-3000:]
    (path,) = (tmp_path / "eval").glob("checkpoints_*_n8.json")
    rows = json.load(open(path))["rows"]
    assert [r["step"] for r in rows] == [6] and rows[0]["wall_minutes"] == 3.0 / 60
    assert rows[0]["report"]["num_samples"] == 8

    before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
    cases = [
        ["--workdir", work, "--out", out],                                    # occupied
        ["--workdir", str(tmp_path / "none"), "--out", tmp_path / "a"],       # no run
        ["--workdir", work, "--step", "5", "--out", tmp_path / "b"],          # no such step
        ["--workdir", work, "--out", tmp_path / "c", "--check_num", "8"],     # not MNIST-shaped
        ["--workdir", work, "--out", tmp_path / "d", "--check_num", "1"],
    ]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in cases])], cwd=REPO,
                          capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fragments = ["is not empty", "no training run", "step 5", "MNIST-shaped", "at least 2 samples"]
    for (code, err), fragment in zip(json.loads(proc.stdout.strip().splitlines()[-1]), fragments):
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before
    assert not any(os.path.exists(tmp_path / n) for n in "abcd")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_params_score_their_documented_classifier_fid(name):
    """Seed 0 of the check redrawn here. On the machine that wrote the check file the value is the
    same to float32 rounding; elsewhere (another CPU kind, a GPU) rounding can move the sampling
    trajectories apart, at worst as far as an independent draw, whose difference from the
    documented one has standard deviation √2·sd (sd: over the documented seeds). Tolerance 4√2·sd.
    An unusable network (wrong or damaged params) scores classifier FIDs in the hundreds."""
    from ddpm_jax.evaluation import sample_classifier_fid
    from ddpm_jax.runs import load_run

    path = os.path.join(REPO, "pretrained", name)
    assert os.path.getsize(os.path.join(path, "params.msgpack")) < 5 * 2**20
    checks = sorted(n for n in os.listdir(path) if n.startswith("check_n") and n.endswith(".json"))
    assert checks, f"{path} has no check file (experiments.export_params --check_num)"
    with open(os.path.join(path, checks[0]), encoding="utf-8") as f:
        check = json.load(f)
    run = load_run(path)
    assert check["seeds"][0] == 0 and len(check["fid_classifier"]) >= 2
    value = sample_classifier_fid(run, check["num"], 0, os.path.join(path, check["reference"]))
    tol = 4 * np.sqrt(2) * check["sd"]
    assert abs(value - check["fid_classifier"][0]) <= tol, (value, check["fid_classifier"][0], tol)
