"""Power-function EMA and post-hoc EMA (ddpm_jax.ema, experiments.posthoc_ema): σ_rel ↔ γ, the exact
weights of an EMA, the least-squares reconstruction on a toy parameter sequence, the snapshot files
and the command line on a tiny run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import ema
from helpers import REPO, cpu_env, main_driver, run_module, tiny_config

# ------------------------------------------------------------------------------------------------
# σ_rel ↔ γ
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [ema.GAMMA_MIN + 0.01, -0.2, 0.0, 1.0, 6.94, 16.97, 100.0, 1e4])
def test_gamma_sigma_rel_round_trip(gamma):
    # Newton-refined roots of the cubic: exact to a few float64 ulps of γ, except near GAMMA_MIN,
    # where σ_rel is flat in γ (dσ/dγ = 0 there) and a rounding of σ_rel moves γ by ~1e-8.
    s = ema.sigma_rel_from_gamma(gamma)
    assert ema.gamma_from_sigma_rel(s) == pytest.approx(gamma, rel=1e-12, abs=1e-7)
    assert ema.sigma_rel_from_gamma(ema.gamma_from_sigma_rel(s)) == pytest.approx(s, rel=1e-14)


def test_edm2_quoted_pairs():
    # Karras et al. (2024), Section 3: σ_rel 0.05 is γ ≈ 16.97, σ_rel 0.10 is γ ≈ 6.94.
    assert round(ema.gamma_from_sigma_rel(0.05), 2) == 16.97
    assert round(ema.gamma_from_sigma_rel(0.10), 2) == 6.94
    assert ema.sigma_rel_from_gamma(ema.GAMMA_MIN) == pytest.approx(ema.SIGMA_REL_MAX, rel=1e-15)
    assert 0.300 < ema.SIGMA_REL_MAX < 0.3004
    # σ_rel falls with γ on the branch gamma_from_sigma_rel returns
    gammas = [ema.gamma_from_sigma_rel(s) for s in (0.3, 0.2, 0.1, 0.05, 0.01)]
    assert gammas == sorted(gammas) and gammas[0] >= ema.GAMMA_MIN


@pytest.mark.parametrize("value", [0.0, -0.05, 0.31, float("nan"), float("inf"), "wide", None])
def test_sigma_rel_outside_the_range_is_one_line(value):
    with pytest.raises(ValueError) as e:
        ema.gamma_from_sigma_rel(value)
    assert "sigma_rel" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("gamma", [-1.0, -3.0, float("nan")])
def test_gamma_at_or_below_minus_one_is_refused(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ema.sigma_rel_from_gamma(gamma)
    with pytest.raises(ValueError, match="gamma"):
        ema.ema_weights(gamma, 10)


# ------------------------------------------------------------------------------------------------
# The update and the weights
# ------------------------------------------------------------------------------------------------


def test_power_decay_in_numpy_and_in_traced_jax():
    g = ema.gamma_from_sigma_rel(0.10)
    t = np.array([1, 2, 10, 1000, 10**6])
    beta = ema.power_decay(t, g)
    assert beta.dtype == np.float64 and beta[0] == 0.0
    np.testing.assert_allclose(beta, (1 - 1 / t) ** (g + 1), rtol=1e-13)  # two float64 formulas of the same β
    np.testing.assert_allclose(ema.power_update_weight(t, g), 1 - (1 - 1 / t) ** (g + 1), rtol=1e-9)

    # jit-traced int step, float32 out. β: float32 rounding, 1e-6 relative. 1 − β: computed directly
    # (expm1/log1p), float32-accurate (1e-6 relative) even at t = 10⁶ where β is within 1e-5 of 1.
    b32 = jax.jit(lambda s: ema.power_decay(s, g))(jnp.asarray(t, jnp.int32))
    w32 = jax.jit(lambda s: ema.power_update_weight(s, g))(jnp.asarray(t, jnp.int32))
    assert b32.dtype == jnp.float32 and w32.dtype == jnp.float32 and float(b32[0]) == 0.0 and float(w32[0]) == 1.0
    np.testing.assert_allclose(np.asarray(b32), beta, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(w32), 1 - beta, rtol=2e-6)
    assert ema.power_decay(jnp.asarray(5.0), g).dtype == jnp.float32


def _recursion_weights(decays, end, start):
    """Runs ema_t = β_t ema_{t−1} + (1 − β_t) θ_t from ema_start = θ_start on the one-hot θ_k = e_k
    (float64): ema_end is then the weight vector itself."""
    theta = np.eye(end + 1)
    e = theta[start].copy()
    for t in range(start + 1, end + 1):
        e = decays(t) * e + (1 - decays(t)) * theta[t]
    return e


@pytest.mark.parametrize("start", [0, 7])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_ema_weights_sum_to_one_and_are_the_recursions(start, sigma_rel):
    g = ema.gamma_from_sigma_rel(sigma_rel)
    for end in (start, start + 1, 50):
        w = ema.ema_weights(g, end, start)
        assert w.shape == (end + 1,) and w.dtype == np.float64
        assert abs(w.sum() - 1.0) < 1e-14  # a telescoping sum: rounding of ~50 terms of size ≤ 1
        assert np.all(w[:start] == 0) and np.all(w >= 0)
        # the recursion rounds once per step (≤ 50 · 1.1e-16 relative to entries ≤ 1)
        np.testing.assert_allclose(w, _recursion_weights(lambda t: float(ema.power_decay(t, g)), end, start),
                                   rtol=0, atol=1e-14)
    assert ema.ema_weights(g, 1, 0).tolist() == [0.0, 1.0]  # β_1 = 0: after one update the EMA is θ_1


def test_constant_ema_weights_are_the_trainers_update():
    from ddpm_jax.train_state import ema_decay_at, ema_update

    end, start, decay = 60, 5, 0.9
    w = ema.constant_ema_weights(decay, end, start)
    # the trainer's own float32 update on one-hot params: update t runs at state.step = t − 1
    e = jnp.eye(end + 1, dtype=jnp.float32)[start]
    for t in range(start + 1, end + 1):
        e = ema_update(e, jnp.eye(end + 1, dtype=jnp.float32)[t], ema_decay_at(t - 1, decay))
    # float32 products of ≤ 60 factors: 60 · 6e-8 relative rounding; weights ≤ 1
    np.testing.assert_allclose(w, np.asarray(e, np.float64), rtol=0, atol=5e-6)
    assert abs(w.sum() - 1.0) < 1e-6 and np.all(w[:start] == 0)


# ------------------------------------------------------------------------------------------------
# Post-hoc reconstruction on a toy parameter sequence
# ------------------------------------------------------------------------------------------------

T_TOY = 2000
EVERY = 100


@pytest.fixture(scope="module")
def walk():
    """θ_k ∈ R^20, k = 0..2000: a Gaussian random walk (float64), |θ| up to ~130."""
    return np.cumsum(np.random.default_rng(0).normal(size=(T_TOY + 1, 20)), axis=0)


def _track(theta, gamma, start, every=EVERY):
    """The power EMA run by its recursion from ema_start = θ_start: {step: value} every ``every`` steps."""
    e, out = theta[start].copy(), {}
    for t in range(start + 1, len(theta)):
        b = float(ema.power_decay(t, gamma))
        e = b * e + (1 - b) * theta[t]
        if t % every == 0:
            out[t] = e.copy()
    return out


@pytest.mark.parametrize("start", [0, 500])
def test_posthoc_reconstruction_of_a_random_walk(walk, start):
    gammas = [ema.gamma_from_sigma_rel(s) for s in (0.05, 0.10)]
    tracks = [_track(walk, g, start) for g in gammas]
    snaps, trees = [], []
    for step in sorted(tracks[0]):  # every 100 steps after the start, both widths
        for g, tr in zip(gammas, tracks):
            snaps.append((step, g, start))
            trees.append(tr[step])
    for target_sigma in (0.07, 0.12):
        g = ema.gamma_from_sigma_rel(target_sigma)
        direct = _track(walk, g, 0)[T_TOY]
        x, info = ema.solve_posthoc(snaps, g, T_TOY)
        recon = ema.reconstruct(trees, x)
        assert info["num_snapshots"] == len(snaps) and x.shape == (len(snaps),)
        assert info["coefficients_sum"] == pytest.approx(1.0, abs=1e-12)
        # Measured residual_l1: 2.3e-3 (σ_rel 0.07) and 2.3e-3 / 2.7e-3 (0.12, start 0 / 500) with
        # 20 snapshots of 2 widths; 5e-3 holds them with a factor ~2 and fails a wrong basis by far.
        assert info["residual_l1"] < 5e-3 and info["residual_l2"] <= info["residual_l1"]

        w_target = ema.ema_weights(g, T_TOY)
        W = np.stack([np.pad(ema.ema_weights(gs, s, st), (0, T_TOY - s)) for s, gs, st in snaps], axis=1)
        r = W @ x - w_target
        assert np.abs(r).sum() == pytest.approx(info["residual_l1"], rel=1e-9)
        assert abs(r.sum()) < 1e-12  # Σ x = 1 and every weight vector sums to 1
        # The exact identity: recon − direct = Σ_k r_k θ_k, up to the recursions' float64 rounding
        # (≤ 2000 steps · 1.1e-16 · |θ| per track, damped by the EMA; measured 1.5e-13 at |θ| ≈ 130).
        scale = np.abs(walk).max()
        np.testing.assert_allclose(recon - direct, r @ walk, rtol=0, atol=1e-12 * scale)
        # the bound the docstring states: |recon − direct| ≤ residual_l1 · max|θ| (+ that rounding)
        assert np.abs(recon - direct).max() <= info["residual_l1"] * scale + 1e-12 * scale


def test_the_plain_least_squares_and_the_constraint(walk):
    snaps = [(s, ema.gamma_from_sigma_rel(sr), 0) for s in range(100, 1001, 100) for sr in (0.05, 0.10)]
    g = ema.gamma_from_sigma_rel(0.08)
    W = np.stack([np.pad(ema.ema_weights(gs, s, st), (0, 1000 - s)) for s, gs, st in snaps], axis=1)
    w = ema.ema_weights(g, 1000)
    best = np.linalg.norm(W @ np.linalg.lstsq(W, w, rcond=None)[0] - w)
    x_plain, plain = ema.solve_posthoc(snaps, g, 1000, sum_to_one=False)
    x_one, one = ema.solve_posthoc(snaps, g, 1000)
    # lstsq on R of the blockwise QR is lstsq on W: the same minimum, to rounding (1e-12 relative)
    assert plain["residual_l2"] == pytest.approx(best, rel=1e-9)
    assert plain["residual_l2"] == pytest.approx(np.linalg.norm(W @ x_plain - w), rel=1e-9)
    # the constraint costs little and fixes Σ x to 1 (the unconstrained one misses by 4.4e-4 here)
    assert best <= one["residual_l2"] < 1.05 * best
    assert x_one.sum() == pytest.approx(1.0, abs=1e-12) and abs(x_plain.sum() - 1.0) > 1e-4


def test_blockwise_solve_equals_one_block(monkeypatch):
    # blocks of 7000 / 7 = 1000 steps, ten of them: the same minimum as lstsq on the whole W
    monkeypatch.setattr(ema, "_BLOCK_ENTRIES", 7000)
    snaps = [(s, g, 0) for s in (3000, 6000, 9000) for g in (ema.gamma_from_sigma_rel(0.05), ema.gamma_from_sigma_rel(0.1))]
    g = ema.gamma_from_sigma_rel(0.07)
    W = np.stack([np.pad(ema.ema_weights(gs, s, st), (0, 9000 - s)) for s, gs, st in snaps], axis=1)
    w = ema.ema_weights(g, 9000)
    x, info = ema.solve_posthoc(snaps, g, 9000, sum_to_one=False)
    assert info["residual_l2"] == pytest.approx(np.linalg.norm(W @ np.linalg.lstsq(W, w, rcond=None)[0] - w), rel=1e-9)
    assert info["residual_l1"] == pytest.approx(np.abs(W @ x - w).sum(), rel=1e-9)
    # the constrained coefficients, ten blocks against one: W's condition number is 9 here, so the
    # QR's rounding (1e-16 relative) moves them by ~1e-15 (measured 1.3e-15); 1e-12 is generous
    x_blocks = ema.solve_posthoc(snaps, g, 9000)[0]
    monkeypatch.setattr(ema, "_BLOCK_ENTRIES", 2 ** 21)
    np.testing.assert_allclose(x_blocks, ema.solve_posthoc(snaps, g, 9000)[0], rtol=0, atol=1e-12)


def test_later_snapshots_are_not_used_and_none_usable_is_refused():
    g = ema.gamma_from_sigma_rel(0.1)
    snaps = [(100, g, 0), (200, g, 0), (300, g, 0)]
    x, info = ema.solve_posthoc(snaps, g, 200)
    assert info["num_snapshots"] == 2 and x[2] == 0.0
    np.testing.assert_allclose(x, [0.0, 1.0, 0.0], atol=1e-9)  # the target is the snapshot of step 200
    assert info["residual_l1"] < 1e-9
    with pytest.raises(ValueError, match="no EMA snapshot at or before step 50"):
        ema.solve_posthoc(snaps, g, 50)
    with pytest.raises(ValueError, match="start_step"):
        ema.solve_posthoc([(10, g, 20)], g, 50)


def test_reconstruct_trees_one_and_many():
    rng = np.random.default_rng(1)
    trees = [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=4).astype(np.float32)}}
             for _ in range(3)]
    c = np.array([0.5, -0.25, 0.75])
    one = ema.reconstruct(iter(trees), c)
    assert one["a"].dtype == np.float32
    # float64 sums of float32 values, rounded once to float32: within one float32 ulp
    want = sum(ci * t["b"]["c"].astype(np.float64) for ci, t in zip(c, trees))
    np.testing.assert_allclose(one["b"]["c"], want, rtol=1.2e-7, atol=1e-7)
    many = ema.reconstruct(trees, np.stack([c, [0.0, 0.0, 1.0]]))
    np.testing.assert_array_equal(many[0]["a"], one["a"])
    np.testing.assert_array_equal(many[1]["a"], trees[2]["a"])
    with pytest.raises(ValueError, match="3 trees for 4"):
        ema.reconstruct(trees, np.ones(4))
    with pytest.raises(ValueError, match="structure"):
        ema.reconstruct(trees[:2] + [{"a": trees[0]["a"]}], c)


# ------------------------------------------------------------------------------------------------
# Snapshot files
# ------------------------------------------------------------------------------------------------


def _flax_params(seed=0):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))

    return Net().init(jax.random.PRNGKey(seed), jnp.ones((1, 3)))["params"]


def test_snapshot_files_round_trip(tmp_path):
    p0, p1 = _flax_params(0), _flax_params(1)
    work = str(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        ema.read_snapshots(work)
    assert "train.ema_snapshot_sigma_rels" in str(e.value) and "\n" not in str(e.value)

    ema.write_snapshot(work, 20, 0, [0.05, 0.10], [p1, p0])
    path = ema.write_snapshot(work, 10, 0, [0.05, 0.10], [p0, p1])
    ema.write_snapshot(work, 10, 3, [0.05, 0.10], [p1, p1])  # the same step again: replaced
    assert path == os.path.join(work, "ema_snapshots", "10.msgpack")
    assert sorted(os.listdir(os.path.dirname(path))) == ["10.msgpack", "20.msgpack"]  # no temporary files left
    open(os.path.join(os.path.dirname(path), ".20.tmp-host-1-x.msgpack"), "wb").close()  # a writer's leftover: ignored

    snaps = ema.read_snapshots(work)
    assert [s["step"] for s in snaps] == [10, 20] and snaps[0]["start_step"] == 3
    assert snaps[1]["sigma_rels"] == [0.05, 0.10]
    assert snaps[1]["gammas"] == [ema.gamma_from_sigma_rel(0.05), ema.gamma_from_sigma_rel(0.10)]
    for got, want in zip(snaps[1]["tracks"], [p1, p0]):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype
            np.testing.assert_array_equal(a, np.asarray(b))
    assert "tracks" not in ema.read_snapshots(work, tracks=False)[0]

    with open(path, "r+b") as f:  # a torn file
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError) as e:
        ema.read_snapshots(work)
    assert path in str(e.value) and "\n" not in str(e.value)
    # without the arrays only the entries before them are read: the torn part shows at the full read
    assert [s["step"] for s in ema.read_snapshots(work, tracks=False)] == [10, 20]
    os.replace(os.path.join(work, "ema_snapshots", "20.msgpack"), path)  # step 20's content under the name 10
    with pytest.raises(ValueError, match="holds step 20"):
        ema.read_snapshots(work)


# ------------------------------------------------------------------------------------------------
# The command line on a tiny run
# ------------------------------------------------------------------------------------------------

TINY_STEP = 30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory without training: configs/mnist.py shrunk (helpers.tiny_config: 8×8×1, the
    small ScoreNet), config.json, the checkpoint of step 30 and EMA snapshots of steps 10, 20, 30
    (two widths each; their arrays are the initial params plus noise, which is all the command
    needs). Also a run directory with the same config.json and no snapshots."""
    from ddpm_jax import data, rng
    from ddpm_jax.checkpointing import Checkpointer, write_config_json
    from ddpm_jax.models import model_from_config
    from ddpm_jax.train_state import create_train_state, make_optimizer

    config = tiny_config("eps")
    image_shape = (8, 8, 1)
    abstract = jax.eval_shape(model_from_config(config.model, image_shape).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, *image_shape)), jnp.ones((1,)))["params"]
    noise = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: noise.normal(size=a.shape).astype(a.dtype), abstract)  # values: any
    spe = data.steps_per_epoch(config.data.train_size, config.train.batch_size)
    tx = make_optimizer(config.optim, steps_per_epoch=spe, params=params)
    state = create_train_state(params, tx, rng.run_keys(config.seed)[1]).replace(step=jnp.asarray(TINY_STEP, jnp.int32))
    meta = {"step": TINY_STEP, "epoch": TINY_STEP // spe, "step_in_epoch": TINY_STEP % spe, "steps_per_epoch": spe,
            "image_shape": list(image_shape), "wall_seconds": 12.5}
    work, plain = str(tmp_path_factory.mktemp("run")), str(tmp_path_factory.mktemp("plain"))
    for d in (work, plain):
        write_config_json(d, config.to_dict())
    ckpt = Checkpointer(os.path.join(work, "checkpoints"), every_steps=1, keep=3, async_save=False)
    ckpt.save(TINY_STEP, state, meta, force=True)
    ckpt.close()
    for step in (10, 20, 30):
        tracks = [jax.tree_util.tree_map(lambda p: p + noise.normal(size=p.shape).astype(np.float32) * 0.01, params)
                  for _ in range(2)]
        ema.write_snapshot(work, step, 0, [0.05, 0.10], tracks)
    return work, plain


def _expected(work, sigma_rel, step):
    snaps = [s for s in ema.read_snapshots(work) if s["step"] <= step]
    basis = [(s["step"], g, s["start_step"]) for s in snaps for g in s["gammas"]]
    x, info = ema.solve_posthoc(basis, ema.gamma_from_sigma_rel(sigma_rel), step)
    return ema.reconstruct([t for s in snaps for t in s["tracks"]], x), x, info


def _assert_params(got, want):
    import flax.serialization

    got = flax.serialization.to_state_dict(got)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)  # the same float64 sums, cast once: bit for bit


DRIVER = main_driver("posthoc_ema")


def test_posthoc_ema_command_writes_runs_that_load(tiny_run, tmp_path):
    from ddpm_jax.runs import load_run

    work, plain = tiny_run
    out = tmp_path / "phema"
    proc = run_module("experiments.posthoc_ema", "--workdir", work, "--sigma_rel", "0.07,0.12", "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("sigma_rel 0.07 ") and "python -m experiments.sample --workdir" in lines[2]
    assert sorted(os.listdir(out)) == ["posthoc_ema.json", "sigma_rel_0.07", "sigma_rel_0.12"]

    for sigma_rel in (0.07, 0.12):
        run = load_run(str(out / f"sigma_rel_{sigma_rel}"))
        want, x, info = _expected(work, sigma_rel, TINY_STEP)
        _assert_params(run.ema_params, want)
        _assert_params(run.params, want)
        assert run.step == TINY_STEP and run.image_shape == (8, 8, 1)
        assert run.config.train.ema == "power" and run.config.train.ema_sigma_rel == sigma_rel
        assert list(run.config.train.ema_snapshot_sigma_rels) == [] and run.config.train.t_sampling == "uniform"
        fit = run.meta["posthoc_ema"]
        assert fit["snapshot_steps"] == [10, 10, 20, 20, 30, 30] and fit["coefficients"] == x.tolist()
        assert fit["residual_l1"] == info["residual_l1"] and fit["gamma"] == ema.gamma_from_sigma_rel(sigma_rel)
        assert not os.path.isabs(fit["source_workdir"])
        assert run.meta["wall_seconds"] == 12.5 and run.meta["steps_per_epoch"] == 3  # the source checkpoint's
    report = json.loads((out / "posthoc_ema.json").read_text())
    assert [r["sigma_rel"] for r in report["rows"]] == [0.07, 0.12] and report["provenance"]["command"].startswith("python")
    assert not any(os.path.isabs(r["path"]) for r in report["rows"])

    # bad input: one line, exit 2, nothing written; then --overwrite at a step without a checkpoint
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)}
    bad_out = tmp_path / "bad"
    cases = [
        ["--workdir", work, "--sigma_rel", "0.5", "--out_dir", bad_out],
        ["--workdir", work, "--sigma_rel", "0.05,wide", "--out_dir", bad_out],
        ["--workdir", work, "--sigma_rel", "0.05", "--step", "5", "--out_dir", bad_out],
        ["--workdir", work, "--sigma_rel", "0.05", "--step", "31", "--out_dir", bad_out],
        ["--workdir", plain, "--sigma_rel", "0.05", "--out_dir", bad_out],
        ["--workdir", work, "--sigma_rel", "0.12", "--out_dir", out],
        ["--workdir", work, "--sigma_rel", "0.12", "--step", "20", "--out_dir", out, "--overwrite"],
    ]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in cases])], cwd=REPO,
                          capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    fragments = ["sigma_rel = 0.5", "'wide' is not a number", "earlier than every EMA snapshot", "after the newest",
                 "train.ema_snapshot_sigma_rels", "is not empty"]
    for (code, err), fragment in zip(results, fragments):
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not bad_out.exists() and not os.path.exists(os.path.join(plain, "posthoc_ema"))
    assert not os.path.exists(os.path.join(work, "posthoc_ema"))
    assert os.path.getmtime(out / "sigma_rel_0.07") == before["sigma_rel_0.07"]

    code, err = results[-1]
    assert code == 0, err
    run = load_run(str(out / "sigma_rel_0.12"))
    assert run.step == 20 and sorted(os.listdir(out / "sigma_rel_0.12" / "checkpoints")) == ["20"]
    _assert_params(run.ema_params, _expected(work, 0.12, 20)[0])
    assert run.meta["epoch"] == 20 // 3 and run.meta["step_in_epoch"] == 20 % 3 and "wall_seconds" not in run.meta
    assert sorted(os.listdir(out)) == ["posthoc_ema.json", "sigma_rel_0.07", "sigma_rel_0.12"]  # no temporaries
