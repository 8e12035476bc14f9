"""Class conditioning and classifier-free guidance: the guided combination, the sampler with
labels, exact class-conditional sampling of a two-class Gaussian mixture, label dropout, and a
conditional run from training to `experiments.sample --class`."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import analytic, guidance, sampling, schedules
from ddpm_jax.models import make_ddpm_unet, make_model, make_model_fn
from helpers import REPO, STD_NAMES, cli_args, cpu_env, make_digits_like, write_dir

SCHED = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
MEANS = jnp.array([[1.5, 0.0], [-1.5, 0.0]])  # two classes in 2-D
STD = 0.5


@pytest.mark.parametrize("param", ["eps", "x0", "v", "mean"])
def test_guided_prediction_is_the_formula_from_one_call_of_2b(param):
    """(1 + w) f(x, t, c) − w f(x, t, ∅) for each parameterisation, from one network call on the
    batch of 2B; float32 rounding of the two products (tolerance 1e-5 relative)."""
    f = analytic.gaussian_mixture_class_denoiser(SCHED, MEANS, STD, parameterisation=param)
    calls = []

    def counted(x, t, y):
        calls.append(x.shape[0])
        return f(x, t, y)

    x = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
    t = jnp.array([1, 20, 50, 100, 150, 200])
    y = jnp.array([0, 1, 0, 1, -1, 0])
    for w in (0.0, 0.5, 2.0):
        calls.clear()
        got = guidance.guided_model_fn(counted, y, w)(x, t)
        want = (1 + w) * f(x, t, y) - w * f(x, t, jnp.full_like(y, guidance.NO_CLASS))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        assert calls == ([6] if w == 0 else [12])  # w = 0: the conditional model alone


def test_sampler_with_labels_and_w0_is_the_conditional_models_sampler():
    f = analytic.gaussian_mixture_class_denoiser(SCHED, MEANS, STD)
    y = jnp.array([0, 1] * 8)
    key = jax.random.PRNGKey(3)
    for method, kw in (("eps_ddpm", {}), ("ddim", {"num_steps": 20}), ("heun", {"num_steps": 8})):
        a = sampling.sample(f, SCHED, (16, 2), key, method=method, labels=y, guidance=0.0, **kw)
        b = sampling.sample(lambda x, t: f(x, t, y), SCHED, (16, 2), key, method=method, **kw)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="needs labels"):
        sampling.sample(f, SCHED, (4, 2), key, method="eps_ddpm", guidance=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        sampling.sample(f, SCHED, (4, 2), key, method="eps_ddpm", labels=y[:4], guidance=-1.0)


def _class_samples(w, n=4000, label=0):
    f = analytic.gaussian_mixture_class_denoiser(SCHED, MEANS, STD)
    y = jnp.full((n,), label)
    return np.asarray(jax.jit(lambda k: sampling.sample(f, SCHED, (n, 2), k, method="eps_ddpm", labels=y,
                                                         guidance=w))(jax.random.PRNGKey(7)))


def test_exact_conditional_denoiser_at_w0_draws_its_class():
    """4,000 ancestral samples of class 0 with the exact class-conditional denoiser: mean (1.5, 0)
    and variance 0.25 per coordinate. Monte Carlo standard errors: mean s/√n = 0.0079, variance
    s²√(2/(n−1)) = 0.0056; tolerance 4 standard errors plus the sampler's discretisation bias
    (σ_t² = β̃_t instead of the true reverse variance, T = 200: a few 1e-3 on the variance)."""
    x = _class_samples(0.0)
    n = x.shape[0]
    se_mean, se_var = STD / np.sqrt(n), STD**2 * np.sqrt(2 / (n - 1))
    np.testing.assert_allclose(x.mean(0), MEANS[0], atol=4 * se_mean)
    np.testing.assert_allclose(x.var(0), STD**2, atol=4 * se_var + 0.01)


def test_guidance_moves_the_samples_away_from_the_other_class():
    """With w > 0 the guided score adds w ∇ log p(c | x_t), which for two Gaussians of equal
    spread points from the other class's mean to this one's (here along +x): the class-0 samples'
    mean moves further along +x as w grows (each step well beyond 4 standard errors, 0.032),
    while across that axis it stays at 0 (4 standard errors)."""
    means = [_class_samples(w).mean(0) for w in (0.0, 1.0, 4.0)]
    n = 4000
    se = STD / np.sqrt(n)
    assert means[0][0] + 4 * se < means[1][0] and means[1][0] + 4 * se < means[2][0], means
    for m in means:
        assert abs(m[1]) < 4 * se * 2, means  # the spread across grows a little with w; 2x room


@pytest.mark.parametrize("family", ["scorenet", "unet"])
def test_networks_take_labels_and_no_class(family):
    """A conditional network has one more embedding row than classes (the "no class" row), its
    output depends on the label, y = None means no class, and an unconditional network has no
    class parameters and refuses labels."""
    build = {"scorenet": lambda k: make_model("small", image_shape=(16, 16, 1), num_classes=k),
             "unet": lambda k: make_ddpm_unet(image_shape=(16, 16, 1), ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                              attn_resolutions=(), dropout=0.0, num_groups=8, num_classes=k)}[family]
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 1))
    t = jnp.array([3.0, 3.0, 3.0])
    model = build(10)
    params = model.init(jax.random.PRNGKey(1), x, t, jnp.zeros(3, jnp.int32))["params"]
    assert params["class_embed"]["embedding"].shape[0] == 11
    fn = make_model_fn(model.apply, params)
    a, b = fn(x, t, jnp.array([1, 2, -1])), fn(x, t)
    assert not np.allclose(np.asarray(a[0]), np.asarray(a[1]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))
    plain = build(0)
    p0 = plain.init(jax.random.PRNGKey(1), x, t)["params"]
    assert "class_embed" not in p0
    with pytest.raises(ValueError, match="unconditional network"):
        plain.apply({"params": p0}, x, t, jnp.zeros(3, jnp.int32))


def test_label_dropout_rate_and_independence_of_the_split():
    """drop_labels replaces a fraction ≈ rate of the labels (binomial: 10,000 draws at 0.1 have
    standard error 0.003; tolerance 4 of them), each example's draw from its own id."""
    labels = jnp.arange(10_000) % 10
    ids = jnp.arange(10_000)
    key = jax.random.PRNGKey(0)
    out = guidance.drop_labels(labels, key, ids, 0.1)
    frac = float(jnp.mean(out == guidance.NO_CLASS))
    assert abs(frac - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 10_000)
    np.testing.assert_array_equal(np.asarray(out[5000:]), np.asarray(guidance.drop_labels(labels[5000:], key, ids[5000:], 0.1)))
    kept = out != guidance.NO_CLASS
    np.testing.assert_array_equal(np.asarray(out[kept]), np.asarray(labels[kept]))
    assert guidance.drop_labels(labels, key, ids, 0.0) is labels


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("idx"), make_digits_like(), STD_NAMES, ".gz")


def _train_cli(idx_dir, workdir, steps, **overrides):
    res = subprocess.run([sys.executable, "-m", "experiments.train", *cli_args(idx_dir, workdir, steps, **overrides)],
                         cwd=REPO, capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, idx_dir):
    """A 10-class run through experiments.train (label dropout 0.2, config guidance 1.0): (workdir, stdout)."""
    work = tmp_path_factory.mktemp("cond") / "run"
    res = _train_cli(idx_dir, work, 4, model__num_classes=10, train__label_dropout=0.2, sampling__guidance=1.0,
                     train__eval_every_epochs=1)
    return work, res.stdout


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, idx_dir):
    """An unconditional run of 2 steps."""
    work = tmp_path_factory.mktemp("plain") / "run"
    _train_cli(idx_dir, work, 2, train__sample_every_epochs=0)
    return work


def test_a_conditional_run_trains_and_draws_the_asked_classes(tmp_path, cond_run, plain_run):
    """model.num_classes = 10 with label dropout through experiments.train, then
    experiments.sample --class 3,7 --guidance 1.5: the samples carry the asked labels in two
    equal blocks and the grid is written; an unconditional run refuses --class."""
    work, stdout = cond_run
    assert "num_classes=10" in stdout and "done: step 4" in stdout
    out = tmp_path / "samples"
    res = subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", str(work), "--class", "3,7",
                          "--guidance", "1.5", "--num", "8", "--batch_size", "4", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["labels"], [3, 3, 3, 3, 7, 7, 7, 7])
        assert z["samples"].shape == (8, 8, 8, 1) and np.isfinite(z["samples"]).all()
    assert os.path.getsize(out / "grid.png") > 0
    bad = subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", str(work), "--class", "12",
                          "--num", "4"], cwd=REPO, capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert bad.returncode != 0 and "class 12 is not in 0..9" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", str(plain_run), "--class", "1",
                          "--num", "4"], cwd=REPO, capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert bad.returncode != 0 and "unconditional" in bad.stderr


def test_guidance_study_scores_each_w_and_resumes(tmp_path, plain_run):
    """experiments.study_guidance on a tiny two-class 28x28 run: a row per w with the classifier's
    accuracy (a fraction), per-class FIDs beside their floors, the overall report, the plot and a
    grid per w; a rerun with one more w samples only that one; an unconditional run is refused."""
    import json

    from helpers import run_module

    idx = write_dir(tmp_path / "idx", make_digits_like(n_train=64, n_test=32, size=28), STD_NAMES, ".gz")
    work = tmp_path / "cond"
    train = run_module("experiments.train", *cli_args(idx, work, 2, model__num_classes=2, train__label_dropout=0.5,
                                                      train__sample_every_epochs=0, train__eval_every_epochs=0))
    assert train.returncode == 0, train.stderr[-3000:]
    out_dir = tmp_path / "eval"
    study = run_module("experiments.study_guidance", "--workdir", work, "--num", 8, "--batch_size", 8,
                       "--guidance", "0,1", "--out_dir", out_dir)
    assert study.returncode == 0, study.stderr[-3000:]
    out = json.load(open(out_dir / "guidance_n8.json"))
    assert [r["guidance"] for r in out["rows"]] == [0.0, 1.0]
    for r in out["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and sorted(r["classes"]) == ["0", "1"]
        for c in r["classes"].values():
            assert c["n"] == 4 and c["fid_classifier"] >= 0 and c["floor_train_vs_test"] >= 0
        assert r["report"]["num_samples"] == 8 and "div_real" in r["report"]["sample_quality"]
    for name in ("guidance_n8.png", "guidance_accuracy_n8.png", "guidance_grid_w0.png", "guidance_grid_w1.png"):
        assert os.path.getsize(out_dir / name) > 0
    again = run_module("experiments.study_guidance", "--workdir", work, "--num", 8, "--batch_size", 8,
                       "--guidance", "1,2", "--out_dir", out_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = json.load(open(out_dir / "guidance_n8.json"))["rows"]
    assert rows[:2] == out["rows"] and [r["guidance"] for r in rows] == [0.0, 1.0, 2.0]
    bad = run_module("experiments.study_guidance", "--workdir", plain_run, "--num", 8, "--out_dir", tmp_path / "e2")
    assert bad.returncode == 2 and "unconditional model" in bad.stderr


def test_a_conditional_runs_sampler_without_labels_draws_unguided_no_class_samples(cond_run):
    """evaluate / score_checkpoints call a run's sampler without labels: on a conditional run with
    a config guidance it then draws from the "no class" row, unguided, not an error."""
    from ddpm_jax.runs import load_run

    run = load_run(str(cond_run[0]))
    opts = run.sampler_options()
    assert opts["guidance"] == 1.0
    key = jax.random.PRNGKey(0)
    plain = np.asarray(run.make_sampler(4, opts)(key))
    no_class = np.asarray(run.make_sampler(4, opts)(key, jnp.full((4,), guidance.NO_CLASS)))
    # guided no-class: (1 + w) f(∅) − w f(∅) = f(∅) up to float rounding of the combination
    np.testing.assert_allclose(plain, no_class, rtol=1e-4, atol=1e-4)
