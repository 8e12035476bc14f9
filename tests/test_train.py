"""Training: real steps for every objective, learning, optimiser groups, data parallelism,
bit-for-bit resume, the CLI end to end, and clear errors for bad configs and workdirs.

All runs use 8x8 images and T = 20 (``helpers.tiny_config``) so each takes seconds.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import data, objectives, provenance
from ddpm_jax.checkpointing import Checkpointer, async_save_is_safe
from ddpm_jax.config import ConfigError, validate_config
from ddpm_jax.models import make_model
from ddpm_jax.train_state import create_train_state, ema_decay_at, make_lr_schedule, make_optimizer
from ddpm_jax.train_step import Parallel, StepConfig
from ddpm_jax.config import schedule_from_config as build_schedule
from ddpm_jax.trainer import train_and_evaluate
from helpers import REPO, STD_NAMES, cli_args, cpu_env, make_digits_like, tiny_config, write_dir

ARRAYS = {k: (v[..., None] if k.endswith("images") else v.astype(np.int32)) for k, v in make_digits_like().items()}


def _setup(config):
    """(parallel runner, state, schedule, splits) for a tiny config, as the trainer builds them."""
    splits = data.load_splits("arrays", arrays=ARRAYS, train_size=config.data.train_size, val_size=config.data.val_size, seed=config.seed)
    model = make_model(config.model.preset, image_shape=splits.image_shape, rho_head=config.model.rho_head)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))["params"]
    spe = data.steps_per_epoch(config.data.train_size, config.train.batch_size)
    tx = make_optimizer(config.optim, steps_per_epoch=spe, params=params)
    loss_fn = objectives.get_objective(config.objective.name, weighting=config.objective.weighting, reduction=config.objective.reduction)
    cfg = StepConfig(model.apply, loss_fn, tx, config.train.ema_decay, config.model.time_input)
    return Parallel(cfg, mode="jit"), create_train_state(params, tx, jax.random.PRNGKey(1)), build_schedule(config), splits


@pytest.mark.parametrize("objective", ["eps", "mean", "xprev", "x0", "v"])
def test_one_real_step_every_objective(objective):
    config = tiny_config(objective)
    par, state, schedule, splits = _setup(config)
    before = jax.device_get(state)
    new, metrics = par.train(par.put_state(state), schedule, par.put_batch(splits.train[:16]))
    new = jax.device_get(new)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, before.params)
    assert moved["conv1"]["kernel"] > 0
    assert moved["time_features"]["W"] == 0.0  # the Fourier frequencies are frozen
    if config.model.rho_head:
        # Adam's first step moves every parameter by ≈ lr (m̂/√v̂ = ±1): ρ at its own rate 0.2.
        np.testing.assert_allclose(moved["rho0"], config.optim.rho_learning_rate, rtol=1e-3)
        np.testing.assert_allclose(moved["conv1"]["kernel"], config.optim.learning_rate, rtol=1e-3)
    # EMA after one step: decay_0 = min(0.999, 1/10) = 0.1, so ema = 0.1·old + 0.9·new.
    np.testing.assert_allclose(
        np.asarray(new.ema_params["conv1"]["kernel"]),
        0.1 * np.asarray(before.params["conv1"]["kernel"]) + 0.9 * np.asarray(new.params["conv1"]["kernel"]),
        rtol=1e-5, atol=1e-7,
    )


def test_loss_falls_on_a_tiny_dataset():
    """100 steps on 48 tiny images: the validation-style loss on the training images (fixed
    keys, so before and after see identical t and noise) must fall well below its start."""
    config = tiny_config("eps")
    par, state, schedule, splits = _setup(config)
    key = jax.random.PRNGKey(5)
    before = par.evaluate(state.params, schedule, splits.train, key, 16)
    st = par.put_state(state)
    it = data.BatchIterator(splits.train, 16, seed=0)
    for step, batch in it.take(100):
        st, _ = par.train(st, schedule, par.put_batch(batch))
    after = par.evaluate(par.get_state(st).params, schedule, splits.train, key, 16)
    assert after < 0.5 * before, (before, after)


def test_lr_schedule_is_the_notebooks_step_decay():
    sched = make_lr_schedule(0.01, steps_per_epoch=500, decay_factor=0.1, decay_every_epochs=20)
    for step, lr in [(0, 0.01), (9_999, 0.01), (10_000, 0.001), (19_999, 0.001), (20_000, 1e-4), (29_999, 1e-4)]:
        np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6)
    warm = make_lr_schedule(0.01, steps_per_epoch=10, decay_every_epochs=0, warmup_steps=100)
    np.testing.assert_allclose([float(warm(s)) for s in (0, 50, 100, 5000)], [0.0, 0.005, 0.01, 0.01], rtol=1e-6, atol=1e-12)
    assert float(ema_decay_at(0, 0.999)) == pytest.approx(0.1) and float(ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)


def test_linear_annealing_reaches_zero_after_warm_up_and_excludes_step_decay():
    sched = make_lr_schedule(0.01, steps_per_epoch=10, warmup_steps=10, anneal_steps=100)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110, 500)], [0.0, 0.005, 0.01, 0.005, 0.0, 0.0],
                               rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="set one of them"):
        make_lr_schedule(0.01, steps_per_epoch=10, decay_every_epochs=2, anneal_steps=100)
    with pytest.raises(ConfigError, match="two learning-rate schedules"):
        validate_config(tiny_config("eps", **{"optim.decay_every_epochs": 2, "optim.anneal_steps": 100}))


def test_gradient_clipping_is_applied_before_adam():
    """With optim.grad_clip_norm = c, the optimiser equals plain Adam fed clip_by_global_norm(c)
    gradients (checked over two steps whose gradient norms differ, where Adam's output depends
    on the clipping)."""
    config = tiny_config("eps")
    _, state, _, _ = _setup(config)
    params = state.params
    plain = make_optimizer(config.optim, steps_per_epoch=3, params=params)
    config.optim.grad_clip_norm = 1e-3
    clipped = make_optimizer(config.optim, steps_per_epoch=3, params=params)
    clip = optax.clip_by_global_norm(1e-3)
    s_plain, s_clip = plain.init(params), clipped.init(params)
    for scale in (1.0, 0.1):
        g = jax.tree_util.tree_map(lambda p: scale * jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params)
        u_clip, s_clip = clipped.update(g, s_clip, params)
        u_ref, s_plain = plain.update(clip.update(g, clip.init(params))[0], s_plain, params)
        for a, b in zip(jax.tree_util.tree_leaves(u_clip), jax.tree_util.tree_leaves(u_ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


PARALLEL_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    import jax, numpy as np, optax
    assert jax.device_count() == 8, jax.device_count()
    import test_train as T
    from ddpm_jax import data
    from ddpm_jax.train_state import create_train_state
    from ddpm_jax.train_step import Parallel
    config = T.tiny_config("mean")
    par, state, schedule, splits = T._setup(config)

    def run(p, state, batch):
        st, losses = p.put_state(state), []
        for i in range(3):
            st, m = p.train(st, schedule, p.put_batch(splits.train[i * batch:(i + 1) * batch]))
            losses.append(float(m["loss"]))
        return jax.device_get(p.get_state(st)), losses

    def rel(a, b):
        return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)), a, b)))

    one_device = data.make_mesh(jax.devices()[:1])
    out = {{}}
    for opt in ("sgd", "adam"):
        cfg = par.cfg if opt == "adam" else dataclasses.replace(par.cfg, tx=optax.sgd(1e-5))
        st0 = jax.device_get(create_train_state(state.params, cfg.tx, state.rng))  # host copy, reused
        for batch in (16, 12):  # 12: padded to 16 on 8 devices
            ref, ref_losses = run(Parallel(cfg, mode="jit", mesh=one_device, flat_allreduce=False), st0, batch)
            forms = {{"jit_xla": Parallel(cfg, mode="jit", flat_allreduce=False),
                     "jit_flat": Parallel(cfg, mode="jit", flat_allreduce=True), "pmap": Parallel(cfg, mode="pmap"),
                     "jit_xla_accum2": Parallel(dataclasses.replace(cfg, accum_steps=2), mode="jit", flat_allreduce=False),
                     "one_device_accum4": Parallel(dataclasses.replace(cfg, accum_steps=4), mode="jit", mesh=one_device)}}
            for name, p in forms.items():
                got, losses = run(p, st0, batch)
                moved = lambda s: jax.tree_util.tree_map(lambda a, b: a - b, s.params, st0.params)  # the updates
                out[f"{{opt}}_{{batch}}_{{name}}"] = {{
                    "params": rel(moved(got), moved(ref)), "ema": rel(got.ema_params, ref.ema_params),
                    "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)), "step": int(got.step),
                    "padded": p.padded_batch(batch)}}
    # the flat form's gradient all-reduce: one, of one flat vector (train_step.psum_flat)
    flat = Parallel(par.cfg, flat_allreduce=True)
    st = flat.put_state(jax.device_get(create_train_state(state.params, par.cfg.tx, state.rng)))
    hlo = flat.compile_train(st, schedule, flat.put_batch(splits.train[:16])).as_text()
    reduces = [line for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line]
    out["all_reduce_shapes"] = [line.split(" = ", 1)[1].split(" all-reduce")[0] for line in reduces]
    # psum_flat gives lax.psum's values, here on a tree of float32 leaves of several shapes
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ddpm_jax.train_step import psum_flat
    mesh = Mesh(np.array(jax.devices()), ("d",))
    tree = {{"a": np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5,
            "b": np.linspace(-1, 1, 8 * 20, dtype=np.float32).reshape(8, 4, 5), "c": np.arange(8, dtype=np.float32)}}
    both = jax.jit(jax.shard_map(lambda t: (psum_flat(t, "d"), jax.lax.psum(t, "d")), mesh=mesh,
                                 in_specs=P("d"), out_specs=P(), check_vma=False))
    flat, ref = jax.device_get(both(jax.device_put(tree, NamedSharding(mesh, P("d")))))
    out["psum_flat_equal"] = all(np.array_equal(flat[k], ref[k]) and flat[k].dtype == ref[k].dtype for k in ref)
    print("RESULT", json.dumps(out))
    """
)


def test_every_parallel_form_equals_one_device_on_8_devices(tmp_path):
    """Three steps with a global batch of 16, and of 12 (padded with zero-weight examples to 16),
    split over 8 virtual CPU devices — plain jit with a NamedSharding batch, shard_map with one
    flat all-reduce, pmap, jit with 2 micro-batches — and on one device in 4 micro-batches, each
    against one device on the whole batch. Per-example keys and weights make the noise and the
    loss terms identical, so only float32 summation order differs: a few eps (1.2e-7) relative
    per gradient entry.

    With SGD the total updates (params − init) then agree to rounding: a gradient entry sums
    ~16·64 float32 terms, so ~√1000·eps ≈ 4e-6 relative to the leaf's largest entry (measured
    6e-6 over three steps); tolerance 5e-5. Adam divides each
    gradient entry by its running RMS, so an entry that is zero up to rounding gets an O(lr)
    update of arbitrary sign on either side: parameters cannot be compared tightly there, and
    the Adam check is on the loss at every step (tolerance 1e-4 relative), which stays within
    float error because those entries carry no signal. The flat form meets in one all-reduce of a
    flat vector (`psum_flat`, whose values equal `lax.psum`'s, checked on a small tree)."""
    script = tmp_path / "parallel.py"
    script.write_text(PARALLEL_SCRIPT.format(tests=os.path.join(REPO, "tests"), repo=REPO))
    env = cpu_env(8)  # with spare threads: see helpers.cpu_env
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    forms = ("jit_xla", "jit_flat", "pmap", "jit_xla_accum2", "one_device_accum4")
    for batch in (16, 12):
        for form in forms:
            sgd, adam = out[f"sgd_{batch}_{form}"], out[f"adam_{batch}_{form}"]
            assert sgd["step"] == adam["step"] == 3
            assert sgd["params"] < 5e-5 and sgd["ema"] < 5e-5 and sgd["loss"] < 1e-5, (batch, form, sgd)
            assert adam["loss"] < 1e-4, (batch, form, adam)
    assert out["sgd_12_jit_xla"]["padded"] == 16 and out["sgd_12_one_device_accum4"]["padded"] == 12
    # one all-reduce per step, of one flat f32 vector (not a tuple of the ~40 gradient leaves)
    assert len(out["all_reduce_shapes"]) == 1 and out["all_reduce_shapes"][0].startswith("f32["), out["all_reduce_shapes"]
    assert "," not in out["all_reduce_shapes"][0].split("]")[0], out["all_reduce_shapes"]
    assert out["psum_flat_equal"]


def test_checkpoints_are_synchronous_with_several_cpu_devices(tmp_path):
    """With several CPU devices a background (async) Orbax save beside the training step's
    all-reduce deadlocks XLA:CPU (it aborts after 40 s; see checkpointing.async_save_is_safe), so
    the Checkpointer saves synchronously there and in the background on one device."""
    assert async_save_is_safe() == (jax.local_device_count() == 1 or jax.default_backend() != "cpu")
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "import jax\n"
        "from ddpm_jax.checkpointing import Checkpointer, async_save_is_safe\n"
        "assert jax.local_device_count() == 2, jax.local_device_count()\n"
        "ck = Checkpointer(%r, every_steps=1, keep=1)\n"
        "print('RESULT', async_save_is_safe(), ck.async_save)\n"
        "ck.close()\n" % (REPO, str(tmp_path / "ck")))
    env = cpu_env(2)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("RESULT", 1)[1].split() == ["False", "False"]
    one = Checkpointer(str(tmp_path / "one"), every_steps=1, keep=1, async_save=True)
    assert one.async_save
    one.close()


def _restore(workdir, like):
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    state, meta = ck.restore(like)
    ck.close()
    return state, meta


def test_resume_is_bit_for_bit(tmp_path):
    """2N straight steps == N steps, stop, resume, N more: identical params, EMA, opt state."""
    n = 5
    straight = tiny_config("eps", **{"train.num_steps": 2 * n, "checkpoint.every_steps": 100})
    out_a = train_and_evaluate(straight, str(tmp_path / "a"), arrays=ARRAYS, progress=False)
    first = tiny_config("eps", **{"train.num_steps": n, "checkpoint.every_steps": 100})
    train_and_evaluate(first, str(tmp_path / "b"), arrays=ARRAYS, progress=False)
    out_b = train_and_evaluate(straight, str(tmp_path / "b"), arrays=ARRAYS, progress=False)
    assert out_a["step"] == out_b["step"] == 2 * n
    _, state, _, _ = _setup(straight)
    a, meta_a = _restore(str(tmp_path / "a"), state)
    b, meta_b = _restore(str(tmp_path / "b"), state)
    # wall_seconds is a timing (the resumed run's sums both commands'): checked apart.
    wall_a, wall_b = meta_a.pop("wall_seconds"), meta_b.pop("wall_seconds")
    assert wall_a > 0 and wall_b > 0
    assert meta_a == meta_b == {"step": 2 * n, "epoch": 3, "step_in_epoch": 1, "steps_per_epoch": 3, "image_shape": [8, 8, 1],
                                "num_devices": jax.device_count(), "padded_batch": 16}
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert any("val/loss" in r for r in rows) and any("train/loss" in r for r in rows)


def test_outputs_written(tmp_path):
    config = tiny_config("x0", **{"train.num_steps": 6})
    train_and_evaluate(config, str(tmp_path), arrays=ARRAYS, progress=False)
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "samples/epoch_0001.png", "samples/final.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert json.load(open(tmp_path / "config.json"))["objective"]["name"] == "x0"
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [3, 6]
    assert os.listdir(tmp_path / "tb")


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("train.batch_size", 0, "config.train.batch_size = 0"),
        ("schedule.num_steps", 0, "config.schedule.num_steps = 0"),
        ("schedule.beta_end", 1.0, "config.schedule: every beta_t must be in (0, 1); beta_20 = 1.0"),
        ("schedule.beta_start", -0.1, "beta_1 = -0.1"),
        ("schedule.name", "sigmoid", "unknown schedule 'sigmoid'"),
        ("objective.name", "score", "config.objective.name = 'score'"),
        ("objective.weighting", "snr", "config.objective.weighting"),
        ("sampling.method", "euler", "config.sampling.method = 'euler'"),
        ("model.preset", "huge", "config.model.preset = 'huge'"),
        ("train.ema_decay", 1.0, "config.train.ema_decay = 1.0"),
        ("optim.learning_rate", 0.0, "config.optim.learning_rate = 0.0"),
        ("optim.anneal_steps", -1, "config.optim.anneal_steps = -1"),
        ("data.scale", "[0,255]", "config.data.scale"),
        ("data.source", "web", "config.data.source = 'web'"),
        ("train.parallel", "fsdp", "config.train.parallel"),
        ("model.rho_head", True, "rho_head = True, but objective 'eps'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(key, value, fragment):
    config = tiny_config("eps", **{key: value})
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_idx_source_without_path_is_refused():
    with pytest.raises(ConfigError, match="config.data.path is empty"):
        validate_config(tiny_config("eps", **{"data.source": "idx", "data.path": ""}))


def cfg_method(workdir):
    with open(workdir / "config.json") as f:
        return json.load(f)["sampling"]["method"]


def absolute_paths(obj, where="report"):
    """The places in a JSON-like ``obj`` whose string value is an absolute path."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in absolute_paths(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in absolute_paths(v, f"{where}[{i}]")]
    return [f"{where} = {obj}"] if isinstance(obj, str) and os.path.isabs(obj) else []


def _cli(args, **kw):
    env = cpu_env()
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, capture_output=True, text=True, env=env, **kw)


def test_cli_trains_on_an_idx_directory_and_resumes(tmp_path):
    idx_dir = write_dir(tmp_path / "idx", make_digits_like(), STD_NAMES, ".gz")
    work = tmp_path / "run"
    first = _cli(cli_args(idx_dir, work, 3), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "params=165,865" in first.stdout and "done: step 3" in first.stdout
    second = _cli(cli_args(idx_dir, work, 6), timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 3" in second.stdout and "done: step 6" in second.stdout
    assert os.path.exists(work / "samples" / "final.png")
    # one provenance line per training command: where each part of the run comes from
    rows = [json.loads(line) for line in open(work / "provenance.jsonl")]
    assert [r["step"] for r in rows] == [3, 6] and all(set(provenance.REQUIRED_FIELDS) <= set(r) for r in rows)
    assert rows[1]["command"].startswith("python -m experiments.train ") and not absolute_paths(rows)
    # the sampling CLI restores that run (EMA params) and writes samples.npz and a grid
    env = cpu_env()
    sample = subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", str(work), "--method", "ddim",
                             "--num_steps", "5", "--num", "6", "--batch_size", "4"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert sample.returncode == 0, sample.stderr[-3000:]
    out = np.load(work / "samples" / "ddim_steps5_eta0" / "samples.npz")
    assert out["samples"].shape == (6, 8, 8, 1) and out["images"].min() >= 0 and out["images"].max() <= 1
    assert os.path.getsize(work / "samples" / "ddim_steps5_eta0" / "grid.png") > 0
    # the evaluation CLI on those samples: a JSON report with the pixel FIDs and their floors
    ev = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir", str(work), "--num", "6",
                         "--samples", str(work / "samples" / "ddim_steps5_eta0" / "samples.npz")],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.load(open(work / "eval" / "ddim_steps5_eta0_n6.json"))
    assert {"val", "test", "floor_train_vs_test"} <= set(report["fid_pixel"]) and report["step"] == 6
    # the report names the sampler that drew the file (DDIM, 5 steps), not the config's (eps_ddpm),
    # says where it comes from, and holds no absolute path
    assert cfg_method(work) != "ddim" and report["sampler"]["method"] == "ddim" and report["sampler"]["num_steps"] == 5
    assert report["samples"]["recorded"] and report["samples"]["path"] == os.path.relpath(
        work / "samples" / "ddim_steps5_eta0" / "samples.npz", REPO)
    assert set(provenance.REQUIRED_FIELDS) <= set(report["provenance"])
    assert report["provenance"]["command"].startswith("python -m experiments.evaluate --workdir ")
    assert report["samples"]["provenance"]["command"].startswith("python -m experiments.sample ")
    assert not absolute_paths(report), absolute_paths(report)
    # sampler flags beside --samples describe other samples: refused in one line, nothing written
    mixed = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir", str(work), "--num", "6", "--method",
                            "eps_ddpm", "--samples", str(work / "samples" / "ddim_steps5_eta0" / "samples.npz"),
                            "--out", str(tmp_path / "mixed.json")], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert mixed.returncode == 2 and "--method describes drawing new samples" in mixed.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "mixed.json").exists()
    bad_sample = subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", str(work), "--method", "eps_ddpm",
                                 "--num_steps", "5"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert bad_sample.returncode == 2 and "needs one of" in bad_sample.stderr
    # bad input: a missing data directory is one line on stderr and a non-zero exit
    bad = _cli(cli_args(tmp_path / "nowhere", tmp_path / "run2", 3), timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "nowhere" in bad.stderr
