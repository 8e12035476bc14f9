"""DPM-Solver++(2M), EDM's Heun sampler and the step grids, against hand-derived updates and the
exact probability-flow ODE of Gaussian data.

For x_0 ~ N(m, s²) every marginal x_t ~ N(α_t m, v_t), v_t = α_t² s² + s_t² (α_t = √ᾱ_t,
s_t = √(1 − ᾱ_t)), and the probability-flow ODE keeps each point's standard score:
x_t = α_t m + √v_t (x_T − α_T m)/√v_T. The analytic denoiser (``ddpm_jax.analytic``) is the
exact E[x_0 | x_t], so a solver's only error is its discretisation error.

Tolerances:

* Convergence order: the global error at the last grid step t = 1 behaves as C h^p (1 + O(h)) with
  h the (λ- or σ-)step, so doubling the steps divides it by 2^p up to the O(h) term. At the step
  counts used (20, 40, 80 intervals on T = 1000) the measured ratios are 1.94, 1.97 for DDIM
  (p = 1), 3.77, 3.97 for DPM-Solver++ and 4.22, 4.10 for Heun (p = 2); we accept 2^p within
  ±15 %, which the O(h) term stays inside and a solver of the other order (ratio 2 vs 4) cannot
  reach. Float32 rounding (~1e-5 accumulated over ≤ 160 evaluations) is < 1 % of the smallest
  error (1.5e-3).
* Hand-derived steps are float64 NumPy against the float32 sampler: relative agreement 1e-5
  (a few dozen float32 roundings, u = 6e-8, amplified at most ~100× by the ε̂ ↔ x̂_0 conversions
  at t = 1 where √(1 − ᾱ_1) = 0.01).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import analytic, sampling, schedules, solvers, step_grids

M, S_STD = 0.3, 0.5  # Gaussian data N(0.3, 0.5²)
SHAPE = (512, 4)


@functools.cache
def big_schedule():
    return schedules.make_schedule("linear", 1000)


@functools.cache
def small_schedule():
    return schedules.make_schedule("linear", 20, beta_start=1e-3, beta_end=0.2)


def exact_ode(schedule, x_T, t):
    """The probability-flow ODE's exact solution at step t from x_T at t = T (float64)."""
    ab = np.asarray(schedule.alpha_bars, np.float64)
    T = schedule.num_steps
    v = lambda k: ab[k] * S_STD**2 + 1.0 - ab[k]
    return np.sqrt(ab[t]) * M + np.sqrt(v(t)) * (np.asarray(x_T, np.float64) - np.sqrt(ab[T]) * M) / np.sqrt(v(T))


def run(method, S, grid=None, schedule=None, param="eps", key=0, shape=SHAPE, **kw):
    schedule = schedule or big_schedule()
    fn = analytic.gaussian_data_denoiser(schedule, M, S_STD, param)
    f = jax.jit(lambda k: sampling.sample(fn, schedule, shape, k, method=method, num_steps=S, grid=grid,
                                          parameterisation=param, return_trajectory=True, **kw))
    return f(jax.random.PRNGKey(key))


# --------------------------------------------------------------------------------------------
# Convergence to the exact ODE solution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,grid,order", [("ddim", "uniform_t", 1), ("dpm_solver_pp", "lambda", 2),
                                               ("heun", "edm", 2), ("dpm_solver_pp", "uniform_t", 2)])
def test_converges_at_its_order(method, grid, order):
    """Error at t = 1 (the state before the final x̂_0 step, which every method shares) for
    20, 40, 80 intervals; each halving divides it by 2^order within 15 % (module docstring).
    'uniform_t' DPM-Solver++ has uneven λ-steps and reaches its order only at 80 intervals
    (ratios 1.68, 2.83, 3.74 from 10 intervals): it is checked at the last halving only."""
    errs = []
    for S in (21, 41, 81):
        x0, traj = run(method, S, grid)
        assert int(traj["t"][-1]) == 1
        errs.append(np.abs(np.asarray(traj["x"][-2], np.float64) - exact_ode(big_schedule(), traj["x"][0], 1)).max())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    checked = ratios[-1:] if grid == "uniform_t" and order == 2 else ratios
    for r in checked:
        assert 0.85 * 2**order <= r <= 1.15 * 2**order, (method, grid, errs, ratios)


def test_final_step_is_the_denoiser():
    """The last step of every solver lands on x̂_0(x_{t_1}, t_1): x_0 = E[x_0 | x_1] here."""
    sch = big_schedule()
    for method in ("dpm_solver_pp", "heun", "ddim"):
        x0, traj = run(method, 11)
        x1 = traj["x"][-2]
        want, _ = analytic.gaussian_posterior_x0(sch, M, S_STD, x1, jnp.ones((SHAPE[0],), jnp.int32))
        np.testing.assert_allclose(np.asarray(x0), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=method)


@pytest.mark.parametrize("method", ["dpm_solver_pp", "heun"])
def test_every_parameterisation_gives_the_same_samples(method):
    """The solvers read x̂_0 through the exact conversions, so an ε-, x_0-, v- or μ-network that
    predicts the same posterior mean draws the same samples (float32 rounding: the μ → ε̂
    conversion divides by β_t, losing up to ~2 digits at small t; 1e-4 absolute on values of
    size ~1 leaves a 10× margin over the measured largest difference)."""
    base, _ = run(method, 10, param="x0", shape=(64, 4))
    for param in ("eps", "v", "mean"):
        other, _ = run(method, 10, param=param, shape=(64, 4))
        np.testing.assert_allclose(np.asarray(other), np.asarray(base), atol=1e-4, err_msg=param)


# --------------------------------------------------------------------------------------------
# One step against the hand-derived update (float64 NumPy)
# --------------------------------------------------------------------------------------------


def _np_schedule(schedule):
    """(α_t, s_t) as stored (1 − float32(ᾱ_t) would lose ~4 digits of s_t at small t)."""
    return (np.asarray(schedule.sqrt_alpha_bars, np.float64), np.asarray(schedule.sqrt_one_minus_alpha_bars, np.float64))


def _np_denoise(schedule, x, t):
    a, s = _np_schedule(schedule)
    v = a[t] ** 2 * S_STD**2 + s[t] ** 2
    return M + a[t] * S_STD**2 / v * (x - a[t] * M)


def test_dpm_solver_pp_steps_by_hand():
    """S = 4 on the small schedule (T = 20): a first-order step, two second-order steps
    D̄ = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}, r = h_{i−1}/h_i, and the final x_0 = D_3, each
    applied by hand (float64) to the sampler's own state."""
    sch = small_schedule()
    x0, traj = run("dpm_solver_pp", 4, "uniform_t", schedule=sch, shape=(8, 1))
    ts = [int(t) for t in traj["t"]] + [0]
    assert ts == [20, 14, 7, 1, 0]
    a, s = _np_schedule(sch)
    lam = lambda t: np.log(a[t] / s[t])
    xs = [np.asarray(x, np.float64) for x in traj["x"]]
    d_prev = None
    for i in range(4):
        t, tn = ts[i], ts[i + 1]
        d = _np_denoise(sch, xs[i], t)
        if tn == 0:
            want = d
        else:
            h = lam(tn) - lam(t)
            d_bar = d
            if d_prev is not None:
                r = (lam(t) - lam(ts[i - 1])) / h
                d_bar = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
            want = s[tn] / s[t] * xs[i] + a[tn] * (1 - np.exp(-h)) * d_bar
        np.testing.assert_allclose(xs[i + 1], want, rtol=1e-5, atol=1e-6, err_msg=f"step {t} -> {tn}")
        d_prev = d


def test_heun_steps_by_hand():
    """S = 3 on the small schedule, EDM grid: two Heun steps on x̃ = x/α, σ = s/α, then the
    final Euler step x_0 = D(x̃; σ_{t_1}); each by hand (float64) from the sampler's own state."""
    sch = small_schedule()
    x0, traj = run("heun", 3, schedule=sch, shape=(8, 1))
    ts = [int(t) for t in traj["t"]] + [0]
    assert ts[0] == 20 and ts[2] == 1
    a, s = _np_schedule(sch)
    sig = s / a
    D = lambda xt, t: _np_denoise(sch, a[t] * xt, t)
    xs = [np.asarray(x, np.float64) / a[t] for x, t in zip(traj["x"], ts)]  # x̃ (a[0] = 1)
    for i in range(3):
        t, tn = ts[i], ts[i + 1]
        d = (xs[i] - D(xs[i], t)) / sig[t]
        want = xs[i] + (sig[tn] - sig[t]) * d
        if tn > 0:
            d2 = (want - D(want, tn)) / sig[tn]
            want = xs[i] + (sig[tn] - sig[t]) * (d + d2) / 2
        np.testing.assert_allclose(xs[i + 1], want, rtol=1e-5, atol=1e-6, err_msg=f"step {t} -> {tn}")


def test_heun_churn_step_by_hand():
    """With churn, step i raises the noise level to the step t̂ nearest σ_{t_i}(1 + γ),
    γ = min(S_churn/S, √2 − 1), adds √(σ_t̂² − σ_t²) S_noise z with z from fold_in(split(key)[1], t),
    then takes the Heun step from σ_t̂. Checked by hand on the first step; without churn the same
    key gives a different sample (the noise is used)."""
    sch = small_schedule()
    kw = dict(s_churn=2.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)
    x0, traj = run("heun", 4, "uniform_t", schedule=sch, shape=(8, 1), key=3, **kw)
    plain, _ = run("heun", 4, "uniform_t", schedule=sch, shape=(8, 1), key=3)
    assert np.abs(np.asarray(x0) - np.asarray(plain)).max() > 1e-3
    a, s = _np_schedule(sch)
    sig = s / a
    ts = [int(t) for t in traj["t"]]
    gamma = min(2.0 / 4, np.sqrt(2) - 1)
    t0, t1 = ts[0], ts[1]  # 20 -> 14 on the uniform grid; t̂ = 20 (capped at T)
    hat_targets = [sig[t] * (1 + gamma) for t in ts]
    t_hats = [int(np.argmin(np.abs(np.log(sig[1:]) - np.log(h)))) + 1 for h in hat_targets]
    np.testing.assert_array_equal(np.asarray(solvers.heun_churn_steps(sch, jnp.asarray(ts[::-1]), 2.0, 0.0, np.inf)),
                                  np.maximum(t_hats, ts))
    # the second step (t = 14 -> 7) by hand from the sampler's state at t = 14
    t, tn = ts[1], ts[2]
    t_hat = max(t_hats[1], t)
    assert t_hat > t  # the churn moves this step's level up
    _, k_steps = jax.random.split(jax.random.PRNGKey(3))
    z = np.asarray(jax.random.normal(jax.random.fold_in(k_steps, t), (8, 1)), np.float64)
    D = lambda xt, k: _np_denoise(sch, a[k] * xt, k)
    x = np.asarray(traj["x"][1], np.float64) / a[t]
    x_hat = x + np.sqrt(sig[t_hat] ** 2 - sig[t] ** 2) * z
    d = (x_hat - D(x_hat, t_hat)) / sig[t_hat]
    x_e = x_hat + (sig[tn] - sig[t_hat]) * d
    want = x_hat + (sig[tn] - sig[t_hat]) * (d + (x_e - D(x_e, tn)) / sig[tn]) / 2
    np.testing.assert_allclose(np.asarray(traj["x"][2], np.float64) / a[tn], want, rtol=1e-5, atol=1e-6)
    assert t0 == 20 and t1 == t


def test_heun_counts_2s_minus_1_evaluations():
    """NFE = 2S − 1 for Heun (the final Euler step evaluates once), S for DPM-Solver++ and DDIM,
    counted by a model that records every call on the host."""
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda tt: calls.append(int(tt[0])), t)
        return jnp.zeros_like(x)

    sch = small_schedule()
    for method, S in (("heun", 5), ("dpm_solver_pp", 5), ("ddim", 5)):
        calls.clear()
        jax.block_until_ready(sampling.sample(model_fn, sch, (2, 3), jax.random.PRNGKey(0), method=method, num_steps=S))
        jax.effects_barrier()
        assert len(calls) == sampling.nfe(method, sch.num_steps, S), (method, calls)


# --------------------------------------------------------------------------------------------
# Grids and arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", step_grids.GRIDS)
@pytest.mark.parametrize("S", [1, 2, 5, 20, 200, 1000])
def test_grids_are_distinct_steps_from_1_to_T(grid, S):
    sch = big_schedule()
    taus = np.asarray(step_grids.timestep_grid(sch, S, grid))
    assert taus.shape == (S,) and taus.dtype == np.int32
    assert np.all(np.diff(taus) > 0) and taus[-1] == 1000 and taus[0] >= 1
    if S >= 2:
        assert taus[0] == 1
    if S == 1000:
        np.testing.assert_array_equal(taus, np.arange(1, 1001))


def test_grids_follow_their_spacing():
    """'uniform_t' is ddim_timesteps; 'lambda' points lie within one step's λ-spacing of a uniform
    λ grid; 'edm' points within one step's σ-spacing of the ρ = 7 grid (S = 20, no collisions)."""
    sch = big_schedule()
    S = 20
    np.testing.assert_array_equal(np.asarray(step_grids.timestep_grid(sch, S, "uniform_t")), sampling.ddim_timesteps(1000, S))
    lam = np.asarray(step_grids.log_snr(sch), np.float64)
    taus = np.asarray(step_grids.timestep_grid(sch, S, "lambda"))
    target = np.linspace(lam[1], lam[1000], S)
    spacing = np.abs(np.diff(lam[1:]))
    assert np.all(np.abs(lam[taus] - target) <= np.maximum(spacing[np.minimum(taus - 1, 998)], spacing[np.maximum(taus - 2, 0)]))
    sig = np.exp(-lam)
    taus = np.asarray(step_grids.timestep_grid(sch, S, "edm"))
    r = 1 / 7
    frac = np.linspace(0, 1, S)  # 0 at τ_1 = 1 (σ_min = σ_1), 1 at τ_S = T (σ_max = σ_T)
    target = (sig[1000] ** r + (1 - frac) * (sig[1] ** r - sig[1000] ** r)) ** 7
    logs = np.log(sig[1:])  # t = 1..T (σ_0 = 0)
    lspacing = np.abs(np.diff(logs))
    assert np.all(np.abs(logs[taus - 1] - np.log(target)) <= np.maximum(lspacing[np.minimum(taus - 1, 998)], lspacing[np.maximum(taus - 2, 0)]))


def test_grids_work_with_a_traced_schedule():
    sch = big_schedule()
    got = jax.jit(lambda s: step_grids.timestep_grid(s, 10, "edm"))(sch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(step_grids.timestep_grid(sch, 10, "edm")))


def test_default_grids_and_nfe():
    assert sampling.STRIDED == {"ddim": "uniform_t", "dpm_solver_pp": "lambda", "heun": "edm"}
    assert sampling.nfe("heun", 1000, 10) == 19 and sampling.nfe("dpm_solver_pp", 1000, 10) == 10
    assert sampling.nfe("eps_ddpm", 200) == 200


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "eps_ddpm", "grid": "lambda"}, "takes every step"),
        ({"method": "ddim", "num_steps": 5, "grid": "log"}, "unknown step grid 'log'"),
        ({"method": "ddim", "num_steps": 5, "s_churn": 1.0}, "settings of method 'heun'"),
        ({"method": "heun", "num_steps": 5, "s_churn": -1.0}, "s_churn, s_tmin, s_noise >= 0"),
        ({"method": "heun", "num_steps": 5, "s_churn": 1.0, "s_tmin": 2.0, "s_tmax": 1.0}, "s_tmin <= s_tmax"),
        ({"method": "dpm_solver_pp", "num_steps": 0}, "num_steps must be an integer in 1..T"),
    ],
)
def test_bad_solver_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(lambda x, t: x, small_schedule(), (2, 3), jax.random.PRNGKey(0), **kw)
