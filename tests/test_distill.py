"""Progressive distillation: the target against a hand computation, the exact student of Gaussian
data, a trained toy student against its teacher, and experiments.distill's resume and input checks."""

import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, STD_NAMES, cpu_env, make_digits_like, run_module, tiny_config, write_dir

from ddpm_jax import analytic, diffusion, distillation as dist, rng, sampling, schedules


def _linear(T, dtype=jnp.float32):
    return schedules.make_schedule("linear", T, beta_start=1e-4, beta_end=0.02, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------


def test_stage_grids_nest_and_start_on_the_samplers_grid():
    """The first teacher's grid is experiments.sample's DDIM grid; every later grid is every other
    point of the one above from the top (T kept), so each student step has one teacher midpoint.
    DDIM's own grids do not nest, which is why the halving grid is recorded."""
    grids = dist.stage_grids(1000, 128, 4)
    assert sorted(grids) == [4, 8, 16, 32, 64, 128]
    np.testing.assert_array_equal(grids[128], sampling.ddim_timesteps(1000, 128))
    for n in (4, 8, 16, 32, 64):
        assert grids[n][-1] == 1000 and len(grids[n]) == n and dist.nests(grids[n], grids[2 * n])
    assert not dist.nests(sampling.ddim_timesteps(1000, 4), sampling.ddim_timesteps(1000, 8))
    stage = dist.stage_steps(grids[8])
    np.testing.assert_array_equal(stage.t, grids[4])
    np.testing.assert_array_equal(stage.t_next, np.concatenate([[0], grids[4][:-1]]))
    assert np.all((stage.t_next < stage.t_mid) & (stage.t_mid < stage.t))


@pytest.mark.parametrize("teacher, target, T, words", [(12, 4, 1000, "power of two"), (4, 8, 1000, "fewer"),
                                                       (4, 4, 1000, "fewer"), (64, 1, 20, "exceeds"), (8, 0, 1000, ">= 1")])
def test_bad_stage_counts_are_one_line(teacher, target, T, words):
    with pytest.raises(ValueError, match=words) as e:
        dist.stage_grids(T, teacher, target)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# The target: by hand, and the exact student of Gaussian data
# ------------------------------------------------------------------------------------------------


def test_target_equals_two_hand_ddim_steps_on_a_scalar(x64):
    """float64 NumPy by hand (ᾱ from the βs, two DDIM steps, then the x̃ that one step maps onto
    the same point) against the library, for a nonlinear ε-teacher, with and without clipping, on
    student steps that end at t'' > 0 and at t'' = 0."""
    T = 50
    sched = _linear(T, jnp.float64)
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    np.testing.assert_allclose(np.asarray(sched.alpha_bars), abar, rtol=1e-12)
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)

    def eps_np(z, t):
        return np.tanh(0.7 * z) + 0.01 * t

    def eps_jax(z, t):
        return jnp.tanh(0.7 * z) + 0.01 * t

    z = np.array([0.8, -1.3, 0.25])
    t, t_mid, t_next = np.array([40, 17, 9]), np.array([25, 11, 4]), np.array([10, 0, 0])
    for clip in (None, (-1.0, 1.0)):
        want, z_want = [], []
        for zi, t1, t2, t3 in zip(z, t, t_mid, t_next):
            x1 = (zi - s[t1] * eps_np(zi, t1)) / a[t1]
            x1 = x1 if clip is None else min(max(x1, clip[0]), clip[1])
            z_mid = a[t2] * x1 + s[t2] * (zi - a[t1] * x1) / s[t1]
            x2 = (z_mid - s[t2] * eps_np(z_mid, t2)) / a[t2]
            x2 = x2 if clip is None else min(max(x2, clip[0]), clip[1])
            z3 = a[t3] * x2 + s[t3] * (z_mid - a[t2] * x2) / s[t2]
            # one step t -> t'' with x: z3 = a3 x + s3 (z - a1 x)/s1  =>  x = (z3 - s3/s1 z)/(a3 - s3/s1 a1)
            want.append((z3 - s[t3] / s[t1] * zi) / (a[t3] - s[t3] / s[t1] * a[t1]))
            z_want.append(z3)
        got, z_got = dist.distillation_target(sched, eps_jax, jnp.asarray(z), jnp.asarray(t), jnp.asarray(t_mid),
                                              jnp.asarray(t_next), parameterisation="eps", clip_x0=clip,
                                              return_z_next=True)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(z_got), z_want, rtol=1e-12, atol=1e-12)
        # at t'' = 0 the target is the teacher's last data prediction, z_0 itself
        np.testing.assert_allclose(np.asarray(got)[1:], np.asarray(z_got)[1:], rtol=0, atol=1e-14)
        # and one DDIM step of the target lands on the teacher's two-step point
        np.testing.assert_allclose(dist.ddim_step(sched, jnp.asarray(z), jnp.asarray(t), jnp.asarray(t_next), got),
                                   z_want, rtol=1e-12, atol=1e-12)


def _affine_ddim(a, s, A, b, t, u):
    """The DDIM step t -> u of a denoiser x̂(z) = A z + b as an affine map z -> c z + d."""
    k = a[u] - s[u] * a[t] / s[t]
    return s[u] / s[t] + k * A, k * b


@pytest.mark.parametrize("student_param", ["v", "x0", "eps"])
def test_exact_student_of_gaussian_data_has_zero_loss(x64, student_param):
    """Data x ~ N(m, s²): the exact teacher x̂(z, t) = m + α_t s²/v_t (z − α_t m), v_t = α_t² s² + σ_t²,
    is affine in z, so the teacher's two DDIM steps are an affine map z_t -> z_{t''} = C z_t + D and
    the target x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t)/(α_{t''} − (σ_{t''}/σ_t) α_t) is affine too:
    x̃ = P_t z_t + Q_t. The student that predicts it exactly (in any parameterisation) has zero
    distillation loss to float64 rounding on every student step."""
    T, m, sd = 1000, 0.3, 0.5
    sched = _linear(T, jnp.float64)
    abar = np.asarray(sched.alpha_bars, np.float64)
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    var = a ** 2 * sd ** 2 + s ** 2
    A, b = a * sd ** 2 / var, m * s ** 2 / var  # x̂ = A_t z + b_t (A_0 = 1, b_0 = 0: x̂ = z_0)
    stage = dist.stage_steps(dist.stage_grids(T, 8, 4)[8])
    P, Q = np.zeros(T + 1), np.zeros(T + 1)
    for t, tm, tn in zip(*(np.asarray(v) for v in (stage.t, stage.t_mid, stage.t_next))):
        c1, d1 = _affine_ddim(a, s, A[t], b[t], t, tm)
        c2, d2 = _affine_ddim(a, s, A[tm], b[tm], tm, tn)
        C, D = c2 * c1, c2 * d1 + d2
        den = a[tn] - s[tn] / s[t] * a[t]
        P[t], Q[t] = (C - s[tn] / s[t]) / den, D / den
    P, Q = jnp.asarray(P), jnp.asarray(Q)

    def student(z, t):
        x = P[t][:, None, None, None] * z + Q[t][:, None, None, None]
        eps = diffusion.predict_eps_from_x0(sched, z, t, x)
        return {"x0": x, "eps": eps, "v": diffusion.predict_v(sched, x, t, eps)}[student_param]

    teacher = analytic.gaussian_data_denoiser(sched, m, sd, "eps")
    x0 = m + sd * jax.random.normal(jax.random.PRNGKey(0), (64, 3, 3, 1), jnp.float64)
    keys = rng.per_example_keys(jax.random.PRNGKey(1), jnp.arange(64))
    loss, aux = dist.distillation_loss(sched, student, teacher, x0, keys, stage, student_param=student_param,
                                      teacher_param="eps")
    assert set(np.asarray(aux["t"]).tolist()) == set(np.asarray(stage.t).tolist())  # every student step drawn
    assert float(jnp.max(loss)) < 1e-20, float(jnp.max(loss))
    # a student that is off by 1e-3 is not: the loss sees the error
    off = dist.distillation_loss(sched, lambda z, t: student(z, t) + 1e-3, teacher, x0, keys, stage,
                                 student_param=student_param, teacher_param="eps")[0]
    assert float(jnp.min(off)) > 1e-9


def test_sample_on_grid_is_the_ddim_sampler_on_its_grid():
    """On DDIM's own grid, the distilled sampler draws what sampling.sample('ddim', η = 0) draws
    from the same key (float32 rounding)."""
    sched = _linear(1000)
    model = analytic.gaussian_data_denoiser(sched, 0.2, 0.6, "eps")
    key = jax.random.PRNGKey(3)
    want = sampling.sample(model, sched, (8, 4, 4, 1), key, method="ddim", num_steps=5, eta=0.0)
    got = dist.sample_on_grid(model, sched, sampling.ddim_timesteps(1000, 5), (8, 4, 4, 1), key, parameterisation="eps")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# A trained toy student
# ------------------------------------------------------------------------------------------------


def test_trained_student_reproduces_its_teacher_on_a_2d_mixture():
    """Teacher: the exact denoiser of a mixture of four Gaussians at (±1, ±1) with std 0.15 (T = 1000,
    x0-prediction), sampled with 4 DDIM steps. Student: an MLP (three Dense(128) layers, sinusoidal
    time features, v-prediction, random init) trained by ``distill_step`` for 300 Adam steps to take
    2. From the same z_T, the student's 2-step samples are within 0.02 of the teacher's 4-step ones
    (mean absolute difference per coordinate): 1.4 % of the modes' distance √2 from the origin and
    below std/7; the training reaches ~6e-3 here, and 0.02 leaves room for other float rounding.
    The agreement is learnt: the untrained student is > 0.1 away, and the teacher's own 2-step
    sampler (~0.025 away) is more than twice as far as the student."""
    import flax.linen as nn
    import optax

    from ddpm_jax.train_state import create_train_state
    from ddpm_jax.train_step import as_batch

    T = 1000
    sched = _linear(T)
    means = jnp.array([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    std = 0.15
    teacher = analytic.gaussian_mixture_class_denoiser(sched, means, std, parameterisation="x0")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, t):
            f = (t / T)[:, None] * jnp.arange(1, 9, dtype=jnp.float32) * jnp.pi
            h = jnp.concatenate([x, jnp.sin(f), jnp.cos(f)], -1)
            for _ in range(3):
                h = nn.swish(nn.Dense(128)(h))
            return nn.Dense(2)(h)

    net = MLP()
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
    tx = optax.adam(3e-3)
    grids = dist.stage_grids(T, 4, 2)
    stage = dist.stage_steps(grids[4])
    cfg = dist.DistillStepConfig(apply_fn=net.apply, tx=tx, ema_decay=0.0, student_param="v", teacher_param="x0",
                                 teacher_apply_fn=lambda variables, x, t: teacher(x, t.astype(jnp.int32)))
    batch = 256

    @jax.jit
    def train(state):
        def body(st, i):
            k1, k2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(2), i))
            x = means[jax.random.randint(k1, (batch,), 0, 4)] + std * jax.random.normal(k2, (batch, 2))
            st, metrics = dist.distill_step(cfg, st, {}, sched, stage, as_batch(x))
            return st, metrics["loss"]
        return jax.lax.scan(body, state, jnp.arange(300))

    def student_samples(p):
        fn = lambda x, t: net.apply({"params": p}, x, t.astype(jnp.float32))  # noqa: E731
        return dist.sample_on_grid(fn, sched, grids[2], (2000, 2), jax.random.PRNGKey(5), parameterisation="v")

    state, losses = train(create_train_state(params, tx, jax.random.PRNGKey(1)))
    assert np.all(np.isfinite(np.asarray(losses))) and float(losses[-20:].mean()) < 0.01 * float(losses[0])
    key = jax.random.PRNGKey(5)
    teacher4 = dist.sample_on_grid(teacher, sched, grids[4], (2000, 2), key, parameterisation="x0")
    teacher2 = dist.sample_on_grid(teacher, sched, grids[2], (2000, 2), key, parameterisation="x0")
    err = float(jnp.mean(jnp.abs(student_samples(state.params) - teacher4)))
    assert err < 0.02, err
    assert float(jnp.mean(jnp.abs(student_samples(params) - teacher4))) > 0.1
    assert err < 0.5 * float(jnp.mean(jnp.abs(teacher2 - teacher4)))


# ------------------------------------------------------------------------------------------------
# experiments.distill
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny teacher run (tests/helpers.py's tiny config with the research U-Net at 4 channels, one
    level, no attention: 2,801 parameters; T = 20, 8x8 IDX data) with random weights (N(0, 0.1²), no
    compiled init), written with run_writer: distillation needs a run, not a good one."""
    from ddpm_jax import run_writer
    from ddpm_jax.models import model_from_config
    from ddpm_jax.train_state import create_train_state, make_optimizer

    root = tmp_path_factory.mktemp("distill")
    c = tiny_config("eps")
    c.data.source, c.data.path = "idx", write_dir(root / "idx", make_digits_like(), STD_NAMES, ".gz")
    c.model.update(name="unet", ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=2)
    shape = (8, 8, 1)
    model = model_from_config(c.model, shape)
    shapes = jax.eval_shape(model.init, rng.run_keys(0)[0], jnp.zeros((1,) + shape), jnp.ones((1,)))["params"]
    draw = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(draw.normal(0.0, 0.1, a.shape), a.dtype), shapes)
    state = create_train_state(params, make_optimizer(c.optim, steps_per_epoch=3, params=params), rng.run_keys(0)[1])
    meta = {"step": 0, "epoch": 0, "step_in_epoch": 0, "steps_per_epoch": 3, "image_shape": list(shape)}
    run_writer.write_run(str(root / "teacher"), c.to_dict(), state, meta)
    run_writer.write_params_run(str(root / "teacher_params"), c.to_dict(), params, meta)  # the shipped form
    return root


def test_shipped_params_teach_like_their_run(teacher_run, tmp_path):
    """A params run (experiments.export_params, pretrained/) is accepted as the teacher, with the
    same plan as the training run of the same params."""
    from ddpm_jax.distill_loop import Settings, check_settings

    plans = [check_settings(Settings(teacher=str(teacher_run / name), workdir=str(tmp_path / name), teacher_steps=4,
                                     target_steps=1)) for name in ("teacher", "teacher_params")]
    assert plans[0]["T"] == plans[1]["T"] == 20 and plans[0]["sizes"] == plans[1]["sizes"]
    assert plans[0]["config"] == plans[1]["config"]
    assert not (tmp_path / "teacher_params").exists()  # checking writes nothing


def test_linear_lr_schedule_anneals_each_stage_and_must_match_to_resume(teacher_run, tmp_path):
    """--lr_schedule linear puts optim.anneal_steps = steps_per_stage in every stage's config (the
    student's optimiser is made anew each stage, so the schedule restarts); a workdir whose
    settings file predates the setting resumes as constant and refuses linear in one line."""
    import json

    import ml_collections

    from ddpm_jax.config import validate_config
    from ddpm_jax.distill_loop import SETTINGS_FILE, Settings, check_settings, distilled_config

    teacher = str(teacher_run / "teacher")

    def plan(schedule, work="work"):
        return check_settings(Settings(teacher=teacher, workdir=str(tmp_path / work), teacher_steps=4, target_steps=1,
                                       steps_per_stage=6, lr_schedule=schedule))

    for schedule, anneal in (("linear", 6), ("constant", 0)):
        p = plan(schedule)
        cfg = distilled_config(p["config"], p["settings"], 2, teacher_rel="teacher", teacher_step=0)
        assert p["settings"]["lr_schedule"] == schedule and cfg["optim"]["anneal_steps"] == anneal
        validate_config(ml_collections.ConfigDict(cfg))
    with pytest.raises(ValueError, match="--lr_schedule='cosine'"):
        plan("cosine")

    old = dict(plan("constant")["settings"])
    del old["lr_schedule"]  # a distillation written before the setting existed ran at a constant rate
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / SETTINGS_FILE).write_text(json.dumps(old))
    assert plan("constant", "old")["settings"]["lr_schedule"] == "constant"
    with pytest.raises(ValueError) as e:
        plan("linear", "old")
    assert "--lr_schedule='constant', but this one has --lr_schedule='linear'" in str(e.value)
    assert "\n" not in str(e.value)


ARGS = ["--teacher_steps", "4", "--steps_per_stage", "6", "--checkpoint_every_steps", "3", "--log_every_steps", "3"]

KILL_AFTER_SAVE = textwrap.dedent(
    """
    # experiments.distill, but the process SIGKILLs itself right after starting the save of step {kill_step}
    import os, runpy, signal, sys
    sys.path.insert(0, {repo!r})
    from ddpm_jax import checkpointing

    original = checkpointing.Checkpointer.save

    def save(self, step, state, meta, *, force=False):
        started = original(self, step, state, meta, force=force)
        if started and int(step) == {kill_step} and not os.path.basename(os.path.dirname(self.directory)).startswith("."):
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpointing.Checkpointer.save = save
    sys.argv = ["experiments.distill"] + sys.argv[1:]
    runpy.run_module("experiments.distill", run_name="__main__")
    """
)


def _distill(*args, devices=1, script=None):
    """experiments.distill in a subprocess, with the malloc settings the entry point would re-execute
    itself to get already in its environment (the same process, started once)."""
    from ddpm_jax import malloc_tuning

    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "experiments.distill"]
    env = cpu_env(PYTHONUNBUFFERED="1", **{malloc_tuning.ENV: malloc_tuning.TUNABLES})
    return subprocess.run(cmd + [*map(str, args), "--cpu_devices", str(devices)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=600)


def _params(path):
    from ddpm_jax.runs import load_run

    run = load_run(str(path))
    return run, jax.tree_util.tree_leaves((run.params, run.ema_params))


def test_sigkill_resumes_bit_for_bit_and_two_devices_agree(teacher_run, tmp_path):
    """A distillation (4 -> 2 -> 1 steps, 6 steps a stage, a checkpoint every 3) SIGKILLed right
    after starting the save at the end of stage 1, rerun and SIGKILLed again after starting a save
    in stage 2, then rerun, writes the same stage runs as an uninterrupted one, bit for bit. Stage 1 run on 2 CPU devices agrees with it to float rounding.
    distill.json counts the compute; the last stage samples with 1 step and refuses any other
    sampler in one line."""
    import json

    teacher = teacher_run / "teacher"
    straight = _distill("--teacher", teacher, "--workdir", tmp_path / "straight", "--target_steps", "1", *ARGS)
    assert straight.returncode == 0, straight.stderr[-3000:]
    work = tmp_path / "killed"
    for kill_step in (6, 9):  # the save at the end of stage 1, then one in stage 2 (resuming from the end of stage 1)
        script = tmp_path / f"kill_{kill_step}.py"
        script.write_text(KILL_AFTER_SAVE.format(repo=REPO, kill_step=kill_step))
        killed = _distill("--teacher", teacher, "--workdir", work, "--target_steps", "1", *ARGS, script=script)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not (work / "stage_1steps").exists() and (work / "stage_2steps" / "config.json").exists()
    resumed = _distill("--teacher", teacher, "--workdir", work, "--target_steps", "1", *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for stage in ("stage_2steps", "stage_1steps"):
        a, pa = _params(work / stage)
        b, pb = _params(tmp_path / "straight" / stage)
        assert a.step == b.step == 6 and a.distilled_grid == b.distilled_grid
        for x, y in zip(pa, pb):
            np.testing.assert_array_equal(x, y)

    two = _distill("--teacher", teacher, "--workdir", tmp_path / "two", "--target_steps", "2", *ARGS, devices=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 cpu device(s)" in two.stdout
    _, p2 = _params(tmp_path / "two" / "stage_2steps")
    _, p1 = _params(tmp_path / "straight" / "stage_2steps")
    for x, y in zip(p2, p1):  # 6 Adam steps of lr 1e-4 could move a weight by 6e-4 at most
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)

    with open(tmp_path / "straight" / "distill.json") as f:
        report = json.load(f)
    assert [r["steps"] for r in report["stages"]] == [2, 1] and report["provenance"]["command"]
    assert [r["grid"] for r in report["stages"]] == [[7, 20], [20]]
    assert report["stages"][0]["forward_equivalents"] == (2 + 3) * 6 * 16
    run, _ = _params(tmp_path / "straight" / "stage_1steps")
    assert run.parameterisation == "v" and run.distilled_grid == [20]
    x = run.make_sampler(4, run.sampler_options())(jax.random.PRNGKey(0))
    assert x.shape == (4, 8, 8, 1) and bool(jnp.all(jnp.isfinite(x)))
    for wrong in ({"num_steps": 2}, {"method": "heun"}, {"eta": 0.5}, {"grid": "lambda"}):
        with pytest.raises(ValueError, match="--num_steps 1") as e:  # experiments.sample prints it as one error: line
            run.sampler_options(**wrong)
        assert "\n" not in str(e.value)

    # experiments.study_distill: the students beside the teacher's solvers, each FID over the reference's
    eval_dir = tmp_path / "eval"
    solvers = run_module("experiments.study_samplers", "--workdir", teacher, "--num", 8, "--batch_size", 8,
                         "--nfe", 2, "--methods", "ddim", "--out_dir", eval_dir)
    assert solvers.returncode == 0, solvers.stderr[-3000:]
    study = run_module("experiments.study_distill", "--workdir", tmp_path / "straight", "--num", 8, "--batch_size", 8,
                       "--solvers", eval_dir / "samplers_n8.json", "--reference", "ddim:2", "--out_dir", eval_dir)
    assert study.returncode == 0, study.stderr[-3000:]
    out = json.load(open(eval_dir / "students_n8.json"))
    ref = json.load(open(eval_dir / "samplers_n8.json"))["rows"][0]["report"]["fid_pixel"]["test"]
    assert out["reference"] == {"name": "ddim", "nfe": 2, "fid": ref}
    assert [(r["nfe"], r["stage"], r["sampler"]["num_steps"]) for r in out["rows"]] == \
        [(1, report["stages"][1], 1), (2, report["stages"][0], 2)]
    for r in out["rows"]:
        assert r["ratio_to_reference"] == r["report"]["fid_pixel"]["test"] / ref and r["report"]["num_samples"] == 8
    assert out["distillation"]["total"] == report["total"] and (eval_dir / "fid_vs_nfe_students_n8.png").stat().st_size
    assert (eval_dir / "distill_loss.png").stat().st_size
    other = run_module("experiments.study_distill", "--workdir", tmp_path / "straight", "--num", 16,
                       "--solvers", eval_dir / "samplers_n8.json", "--out_dir", eval_dir)  # refused before JAX starts
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: --solvers {eval_dir / 'samplers_n8.json'} is not the teacher's study at this N and seed: "
        "num_samples 8 (students: 16)"]


def test_bad_input_is_one_line_and_writes_nothing(teacher_run, tmp_path):
    teacher = teacher_run / "teacher"
    cases = {
        "missing": ["--teacher", tmp_path / "nowhere", "--teacher_steps", "4", "--target_steps", "1"],
        "not_power_of_two": ["--teacher", teacher, "--teacher_steps", "12", "--target_steps", "4"],
        "target_above_teacher": ["--teacher", teacher, "--teacher_steps", "4", "--target_steps", "8"],
        "unknown_param": ["--teacher", teacher, "--teacher_steps", "4", "--target_steps", "1", "--student_param", "mean"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "experiments.distill", *map(str, args), "--workdir",
                                     str(tmp_path / name)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=cpu_env())
             for name, args in cases.items()}
    words = {"missing": "no training run", "not_power_of_two": "power of two", "target_above_teacher": "fewer",
             "unknown_param": "--student_param"}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error:") and words[name] in lines[0], (name, err)
        assert not (tmp_path / name).exists(), name
