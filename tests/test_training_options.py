"""The training options of the loop: train.t_sampling, train.ema ('power') and the power EMAs
tracked for post-hoc EMA (train.ema_snapshot_sigma_rels) — resumed bit for bit, added to a run
that had none, refused when out of range, and the same update on any device layout."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from helpers import REPO, as_arrays, cpu_env, make_digits_like, tiny_config

from ddpm_jax import ema, timestep_sampling
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax.config import ConfigError, validate_config
from ddpm_jax.runs import load_run
from ddpm_jax.trainer import train_and_evaluate

OPTIONS = {"train.t_sampling": "importance", "train.t_importance_history": 2, "train.ema": "power",
           "train.ema_sigma_rel": 0.1, "train.ema_snapshot_sigma_rels": (0.05, 0.1)}


def _state(workdir, step=None):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=100)
    try:
        step = ckpt.latest_step() if step is None else step
        saved = ckpt.saved_fields(step)
        return ckpt.read_meta(step), saved
    finally:
        ckpt.close()


def test_options_resume_bit_for_bit_and_tracks_can_be_added(tmp_path, capfd):
    arrays = as_arrays(make_digits_like())
    run = lambda steps, work, **kw: train_and_evaluate(tiny_config(**{"train.num_steps": steps, **OPTIONS, **kw}),  # noqa: E731
                                                       str(tmp_path / work), arrays=arrays, progress=False)
    run(6, "straight")
    run(3, "resumed")
    run(6, "resumed")
    a, b = load_run(str(tmp_path / "straight")), load_run(str(tmp_path / "resumed"))
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema_params)), jax.tree_util.tree_leaves((b.params, b.ema_params))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the history and the tracked EMAs are part of the checkpoint, so they resume too
    meta, saved = _state(str(tmp_path / "resumed"))
    assert {"t_history", "ema_tracks"} <= set(saved) and sorted(saved["ema_tracks"]) == ["sigma_rel_0.05", "sigma_rel_0.1"]
    assert meta["ema_tracks_start"] == 0
    snaps = [ema.read_snapshot(ema.snapshot_path(str(tmp_path / w), s)) for w in ("straight", "resumed") for s in (3, 6)]
    for i, j in ((0, 2), (1, 3)):
        assert snaps[i]["step"] == snaps[j]["step"] and snaps[i]["start_step"] == 0
        for x, y in zip(jax.tree_util.tree_leaves(snaps[i]["tracks"]), jax.tree_util.tree_leaves(snaps[j]["tracks"])):
            np.testing.assert_array_equal(x, y)
    # the main EMA is the power EMA of σ_rel 0.1, so it equals that track
    for x, y in zip(jax.tree_util.tree_leaves(b.ema_params), jax.tree_util.tree_leaves(snaps[3]["tracks"][1])):
        np.testing.assert_array_equal(np.asarray(x), y)
    # a new σ_rel on resume: every track starts again from the params here, and the snapshots say so
    capfd.readouterr()
    run(9, "resumed", **{"train.ema_snapshot_sigma_rels": (0.05, 0.2)})
    assert "power EMAs sigma_rel_0.05, sigma_rel_0.2: tracked from step 6" in capfd.readouterr().out
    snap = ema.read_snapshot(ema.snapshot_path(str(tmp_path / "resumed"), 9))
    assert snap["start_step"] == 6 and snap["sigma_rels"] == [0.05, 0.2]
    # a checkpoint with options restores for sampling like any other
    assert load_run(str(tmp_path / "resumed")).step == 9


@pytest.mark.parametrize("key,value,match", [
    ("train.t_sampling", "lognormal", "train.t_sampling"),
    ("train.t_log_normal_std", 0.0, "train.t_log_normal_std"),
    ("train.t_importance_history", 0, "train.t_importance_history"),
    ("train.ema", "exponential", "train.ema"),
    ("train.ema_sigma_rel", 0.5, "train.ema_sigma_rel"),
    ("train.ema_snapshot_sigma_rels", (0.05, 0.05), "each value once"),
    ("train.ema_snapshot_sigma_rels", "0.05", "sequence of numbers"),
])
def test_bad_options_are_refused_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(**{key: value}))


LAYOUT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {repo!r} + "/tests")
    import jax, numpy as np
    from helpers import tiny_config
    from ddpm_jax import sharding, timestep_sampling
    from ddpm_jax.config import schedule_from_config
    from ddpm_jax.trainer import _build_step
    from ddpm_jax.train_state import create_train_state
    from ddpm_jax.train_step import Parallel

    config = tiny_config(**{options!r})
    _, params, cfg, _ = _build_step(config, (8, 8, 1), steps_per_epoch=4)
    schedule = schedule_from_config(config)
    images = np.random.default_rng(0).uniform(0, 1, (14, 8, 8, 1)).astype(np.float32)  # 14: padded on 4 devices
    state0 = jax.device_get(create_train_state(params, cfg.tx, jax.random.PRNGKey(1),
                            t_history=timestep_sampling.init_history(20, 2), ema_track_keys=[k for k, _ in cfg.ema_track_gammas]))
    out = {{}}
    for name, n, mode, flat in (("one", 1, "jit", False), ("jit4", 4, "jit", False), ("flat4", 4, "jit", True),
                                ("pmap4", 4, "pmap", False)):
        par = Parallel(cfg, mode=mode, mesh=sharding.make_mesh(jax.devices()[:n]), flat_allreduce=flat)
        st = par.put_state(state0)
        for _ in range(12):  # enough steps to fill the history (20 t x 2 terms from 14 examples a step)
            st, m = par.train(st, schedule, par.put_batch(images))
        st = jax.device_get(par.get_state(st))
        out[name] = {{"count": np.asarray(st.t_history.count).tolist(), "terms": np.asarray(st.t_history.terms).tolist(),
                     "track": float(np.sum(jax.tree_util.tree_leaves(st.ema_tracks)[0])), "loss": float(m["loss"])}}
    print("RESULT", json.dumps(out))
    """
)


def test_importance_history_and_tracks_agree_on_any_device_layout():
    """12 steps of a batch of 14 (padded to 16 on 4 devices) with importance sampling and a
    tracked power EMA, on 1 device and on 4 (jit, one flat all-reduce, pmap): every layout appends
    the same examples to the same t (the counts exactly, padding never), and the terms, the track
    and the loss agree to float32 summation order carried through a dozen Adam steps: 1e-3
    relative (measured up to 1.9e-4; Adam's first updates divide by √v̂ of a few gradients, which
    enlarges the 1e-7 reordering differences of each reduction step by step)."""
    options = {**OPTIONS, "train.batch_size": 14}
    res = subprocess.run([sys.executable, "-c", LAYOUT_SCRIPT.format(repo=REPO, options=options)], capture_output=True,
                         text=True, env=cpu_env(4), cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    ref = out["one"]
    assert sum(ref["count"]) > 0 and ref["count"][0] == 0
    for name in ("jit4", "flat4", "pmap4"):
        assert out[name]["count"] == ref["count"], name
        np.testing.assert_allclose(out[name]["terms"], ref["terms"], rtol=1e-3, atol=1e-6, err_msg=name)
        assert out[name]["track"] == pytest.approx(ref["track"], rel=1e-3), name
        assert out[name]["loss"] == pytest.approx(ref["loss"], rel=1e-3), name


def test_a_checkpoint_without_the_optional_fields_restores_and_resumes_with_them(tmp_path, capfd):
    """A run whose checkpoints hold only step, params, opt_state, ema_params and rng (the state
    before the optional fields existed) loads for sampling and resumes with importance sampling
    and tracked EMAs switched on, which start at the resumed step."""
    import flax.struct

    from ddpm_jax import run_writer
    from ddpm_jax.trainer import _build_step
    from ddpm_jax.train_state import create_train_state

    @flax.struct.dataclass
    class FiveFieldState:  # the saved layout of such a checkpoint: the same field names, no others
        step: object
        params: object
        opt_state: object
        ema_params: object
        rng: object

    config = tiny_config(**{"train.num_steps": 3})
    _, params, cfg, _ = _build_step(config, (8, 8, 1), steps_per_epoch=3)
    full = create_train_state(params, cfg.tx, jax.random.PRNGKey(1))
    old = FiveFieldState(step=jax.numpy.asarray(3, jax.numpy.int32), params=full.params, opt_state=full.opt_state,
                         ema_params=full.ema_params, rng=full.rng)
    meta = {"step": 3, "epoch": 1, "step_in_epoch": 0, "steps_per_epoch": 3, "image_shape": [8, 8, 1], "wall_seconds": 1.0}
    work = str(tmp_path / "old")
    run_writer.write_run(work, config.to_dict(), old, meta)
    assert set(_state(work)[1]) == {"step", "params", "opt_state", "ema_params", "rng"}
    run = load_run(work)
    assert run.step == 3
    np.testing.assert_array_equal(np.asarray(jax.tree_util.tree_leaves(run.params)[0]),
                                  np.asarray(jax.tree_util.tree_leaves(full.params)[0]))
    capfd.readouterr()
    train_and_evaluate(tiny_config(**{"train.num_steps": 6, **OPTIONS}), work, arrays=as_arrays(make_digits_like()),
                       progress=False)
    out = capfd.readouterr().out
    assert "resumed from" in out and "at step 3" in out and "tracked from step 3" in out
    assert "loss history starts empty at step 3" in out
    assert ema.read_snapshot(ema.snapshot_path(work, 6))["start_step"] == 3
