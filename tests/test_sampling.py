"""``sampling.sample`` checked against an independent Python-loop reference and against the exact
law of each sampler on Gaussian data.

Tolerances (each test says where its numbers come from):

* Float32 agreement is checked with a first-order running error bound. The reference runs in
  float64 and carries, next to every value v, a bound e on how far a float32 evaluation of the
  same expression can be from v (:class:`Bounded`): every operation adds one rounding u·|result|
  (u = 2⁻²⁴ ≈ 6e-8, float32 eps 1.2e-7 = 2u), and errors of the operands propagate through
  the operation's derivative (|∂f/∂a|·e_a + |∂f/∂b|·e_b; division and the square root included,
  so cancellation and ill-conditioned conversions such as ε̂ from μ widen the bound exactly
  where float32 loses digits). The sampler evaluates the same algebra in a different order (and
  reads coefficients that were rounded from float64 differently), so its distance from the
  float64 value is of the same order but not below e; we allow ``C_FP = 4`` times the bound
  (measured: the largest |sampler − reference|/e over every method, step and entry is 0.92).
  The bound is ~1e-6 here, while any wrong coefficient, noise scale or key moves values by
  ≳1e-3.
* Monte Carlo: for N draws with sd σ the sample mean has SE σ/√N and the sample variance SE
  σ²·√(2/(N−1)); we allow 5 SE (false-failure rate ≈ 6e-7 per check).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import analytic, sampling, schedules

T_SMALL = 20  # the small schedule: linear β 1e-3..0.2, ᾱ_T ≈ 0.12
SHAPE = (3, 4, 4, 2)

U32 = 2.0**-24  # float32 unit roundoff (eps/2)
C_FP = 4.0  # allowed multiple of the first-order float32 error bound (see the module docstring)


# --------------------------------------------------------------------------------------------
# A float64 number with a first-order bound on the error of its float32 evaluation.
# --------------------------------------------------------------------------------------------


class Bounded:
    """Value ``v`` (float64) and bound ``e`` ≥ |fl32-evaluation − v| (first order in u)."""

    __array_priority__ = 1000  # numpy scalars/arrays defer to our reflected operators

    def __init__(self, v, e=0.0):
        self.v = np.asarray(v, np.float64)
        self.e = np.asarray(e, np.float64)

    @staticmethod
    def leaf(v):
        """A stored float32 coefficient: its value and one rounding of it."""
        v = np.asarray(v, np.float64)
        return Bounded(v, U32 * np.abs(v))

    @staticmethod
    def lift(a):
        return a if isinstance(a, Bounded) else Bounded(a, 0.0)  # Python constants: exact

    @staticmethod
    def _out(v, e):
        return Bounded(v, e + U32 * np.abs(v))

    def __add__(self, o):
        o = Bounded.lift(o)
        return Bounded._out(self.v + o.v, self.e + o.e)

    __radd__ = __add__

    def __sub__(self, o):
        o = Bounded.lift(o)
        return Bounded._out(self.v - o.v, self.e + o.e)

    def __rsub__(self, o):
        return Bounded.lift(o) - self

    def __neg__(self):
        return Bounded(-self.v, self.e)

    def __mul__(self, o):
        o = Bounded.lift(o)
        return Bounded._out(self.v * o.v, np.abs(o.v) * self.e + np.abs(self.v) * o.e)

    __rmul__ = __mul__

    def __truediv__(self, o):
        o = Bounded.lift(o)
        v = self.v / o.v
        return Bounded._out(v, self.e / np.abs(o.v) + np.abs(v) * o.e / np.abs(o.v))

    def __rtruediv__(self, o):
        return Bounded.lift(o) / self

    def sqrt(self):
        """√max(v, 0) (the sampler clips the DDIM radicands the same way); near 0 the error of
        √ is bounded by √e rather than e/(2√v)."""
        v = np.maximum(self.v, 0.0)
        r = np.sqrt(v)
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.where(r > 0, self.e / (2.0 * r), np.inf)
        return Bounded._out(r, np.minimum(prop, np.sqrt(self.e)))


def assert_within_bound(actual, ref: Bounded, what=""):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == ref.v.shape, (what, actual.shape, ref.v.shape)
    err = np.abs(actual - ref.v)
    tol = C_FP * ref.e
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} entries off by more than {C_FP}x the float32 bound; "
        f"worst |diff| {err.max():.3g}, err/bound {np.max(err / np.maximum(ref.e, 1e-300)):.3g}"
    )


# --------------------------------------------------------------------------------------------
# Smooth nonlinear model functions, pure arithmetic so that the same code runs on jnp arrays
# (inside the sampler) and on Bounded numbers (in the reference). Constants are powers of two
# or their small multiples, and tt = t/32 is exact in float32, so both see the same model.
# --------------------------------------------------------------------------------------------


def _h(x):
    return x / (1.0 + x * x)


def _x0_model(x, tt):  # a bounded, smooth "x̂_0"
    return 0.75 * _h(x) + 0.25 * tt * _h(x - 0.5)


def _eps_model(x, tt):  # an "ε̂" that grows with x
    return 0.75 * x - 0.5 * tt * _h(x)


def _mean_model(x, tt):  # a contracting "μ = F(x_t, t)" close to x_t
    return x * (1.0 - 0.125 * tt) - 0.125 * tt * _h(x)


MODELS = {"x0": _x0_model, "eps": _eps_model, "mean": _mean_model}
CONST_X0 = 0.3


@functools.cache
def jax_model(parameterisation):
    if parameterisation == "const_x0":  # x̂_0 = CONST_X0 whatever x_t (read as 'x0')
        return lambda x, t: jnp.full_like(x, CONST_X0)
    f = MODELS[parameterisation]

    def model_fn(x, t):
        tt = (t.astype(jnp.float32) / 32.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return f(x, tt)

    return model_fn


@functools.cache
def small_schedule():
    return schedules.make_schedule("linear", T_SMALL, beta_start=1e-3, beta_end=0.2)


@functools.cache
def sampler(method, model=None, shape=SHAPE, trajectory=True, **kw):
    """``key -> sampling.sample(...)`` jitted once per configuration (compiles dominate the
    runtime of this file), with the method's native analytic model unless ``model`` names one."""
    model = model or sampling.METHODS[method]
    param = "x0" if model == "const_x0" else model
    param = None if param == sampling.METHODS[method] else param  # the default path where native
    fn = functools.partial(sampling.sample, jax_model(model), small_schedule(), shape, method=method,
                           parameterisation=param, return_trajectory=trajectory, **kw)
    return jax.jit(fn)


# --------------------------------------------------------------------------------------------
# The reference: a plain Python loop over the updates exactly as the table in sampling.py's
# module docstring states them, with coefficients computed here from the schedule arrays.
# --------------------------------------------------------------------------------------------

def _coefs(schedule, t):
    """Leaves for time t (0..T) from the schedule's float32 arrays."""
    f = lambda a: Bounded.leaf(float(np.asarray(a)[t]))
    return {"beta": f(schedule.betas), "alpha": f(schedule.alphas), "abar": f(schedule.alpha_bars),
            "one_minus_abar": f(schedule.one_minus_alpha_bars)}


def _x0_eps(param, x, c, pred):
    """(x̂_0, ε̂) from a prediction, by the identity x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂ (and, for
    μ, by inverting μ = (x_t − β_t/√(1 − ᾱ_t) ε̂)/√α_t)."""
    sa, s1m = c["abar"].sqrt(), c["one_minus_abar"].sqrt()
    if param == "x0":
        return pred, (x - sa * pred) / s1m
    if param == "eps":
        eps = pred
    else:  # mean
        eps = (x - c["alpha"].sqrt() * pred) * s1m / c["beta"]
    return (x - s1m * eps) / sa, eps


def reference_step(method, schedule, x, t, t_prev, key_steps, eta=0.0, ddpm_variance="posterior"):
    """One update x_t -> x_{t_prev} of the docstring's table. Returns (x_prev, x̂_0, ε̂)."""
    param = sampling.METHODS[method]
    c, cp = _coefs(schedule, t), _coefs(schedule, t_prev)
    pred = MODELS[param](x, t / 32.0)
    x0_hat, eps_hat = _x0_eps(param, x, c, pred)
    z = Bounded(np.asarray(jax.random.normal(jax.random.fold_in(key_steps, t), SHAPE), np.float64))
    last = t_prev == 0  # no noise at the last step
    if method == "xprev_det":
        x_prev = pred
    elif method == "xprev_noise":
        x_prev = pred if last else pred + c["beta"].sqrt() * z  # √(1 − α_t) = √β_t
    elif method == "x0_fresh":
        x_prev = cp["abar"].sqrt() * x0_hat + cp["one_minus_abar"].sqrt() * z
    elif method in ("x0_coherent", "eps_det"):
        x_prev = cp["abar"].sqrt() * x0_hat + cp["one_minus_abar"].sqrt() * eps_hat
    elif method == "eps_ddpm":
        mu = (x - c["beta"] / c["one_minus_abar"].sqrt() * eps_hat) / c["alpha"].sqrt()
        if ddpm_variance == "posterior":
            var = c["beta"] * cp["one_minus_abar"] / c["one_minus_abar"]  # β̃_t
        else:
            var = c["beta"]
        x_prev = mu if last else mu + var.sqrt() * z
    elif method == "ddim":
        sigma = eta * (cp["one_minus_abar"] / c["one_minus_abar"]).sqrt() * (1.0 - c["abar"] / cp["abar"]).sqrt()
        x_prev = (
            cp["abar"].sqrt() * x0_hat
            + (cp["one_minus_abar"] - sigma * sigma).sqrt() * eps_hat
            + sigma * z
        )
    else:
        raise AssertionError(method)
    return x_prev, x0_hat, eps_hat


def reference_timesteps(method, T, num_steps):
    """Descending steps and their successors, τ_0 = 0 (the docstring's striding for 'ddim')."""
    if method == "ddim" and num_steps not in (None, T):
        taus = [T] if num_steps == 1 else [int(np.round(1 + i * (T - 1) / (num_steps - 1))) for i in range(num_steps)]
    else:
        taus = list(range(1, T + 1))
    taus = [0] + taus
    return [(taus[i], taus[i - 1]) for i in range(len(taus) - 1, 0, -1)]


def reference_sample(method, schedule, key, num_steps=None, eta=0.0, ddpm_variance="posterior"):
    k_init, k_steps = jax.random.split(key)
    x = Bounded(np.asarray(jax.random.normal(k_init, SHAPE), np.float64))  # exact float32 draws
    xs, x0s, epss, ts = [x], [], [], []
    for t, t_prev in reference_timesteps(method, schedule.num_steps, num_steps):
        x, x0_hat, eps_hat = reference_step(method, schedule, x, t, t_prev, k_steps, eta, ddpm_variance)
        xs.append(x)
        x0s.append(x0_hat)
        epss.append(eps_hat)
        ts.append(t)
    return xs, x0s, epss, ts


CASES = [(m, {}) for m in sampling.METHODS if m not in sampling.STRIDED] + [
    ("eps_ddpm", {"ddpm_variance": "beta"}),
    ("ddim", {"eta": 0.0}),  # all T steps
    ("ddim", {"num_steps": 7, "eta": 0.0}),
    ("ddim", {"num_steps": 7, "eta": 0.5}),
    ("ddim", {"num_steps": 7, "eta": 1.0}),
]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{kw}" for m, kw in CASES])
def test_scan_equals_python_loop_reference(method, kw):
    """The scan against the docstring's table, run as a Python loop with the docstring's key
    discipline (x_T from split(key)[0], z at time t from fold_in(split(key)[1], t)): each update
    applied to the sampler's own x_t, then the whole chain from the same x_T; plus the
    trajectory's shapes and order. Tolerance: C_FP x the float32 error bound (module docstring)."""
    schedule = small_schedule()
    key = jax.random.PRNGKey(7)
    x0, traj = sampler(method, **kw)(key)
    S = kw.get("num_steps") or T_SMALL

    # shapes, order of the steps, x_T first and the returned sample last
    assert traj["x"].shape == (S + 1,) + SHAPE
    assert traj["x0"].shape == traj["eps"].shape == (S,) + SHAPE
    assert traj["t"].shape == (S,)
    t_ref = [t for t, _ in reference_timesteps(method, T_SMALL, kw.get("num_steps"))]
    np.testing.assert_array_equal(np.asarray(traj["t"]), t_ref)
    assert np.all(np.diff(np.asarray(traj["t"])) < 0) and int(traj["t"][0]) == T_SMALL and int(traj["t"][-1]) == 1
    np.testing.assert_array_equal(np.asarray(traj["x"][-1]), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.asarray(jax.random.normal(jax.random.split(key)[0], SHAPE)))

    # step for step: the reference update applied to the sampler's own x_t (no accumulation)
    _, k_steps = jax.random.split(key)
    for i, (t, t_prev) in enumerate(reference_timesteps(method, T_SMALL, kw.get("num_steps"))):
        x_prev, x0_hat, eps_hat = reference_step(
            method, schedule, Bounded(np.asarray(traj["x"][i], np.float64)), t, t_prev, k_steps,
            kw.get("eta", 0.0), kw.get("ddpm_variance", "posterior"))
        assert_within_bound(traj["x"][i + 1], x_prev, f"x_{t_prev} from the sampler's x_{t}")
        assert_within_bound(traj["x0"][i], x0_hat, f"x0_hat at t={t}")
        assert_within_bound(traj["eps"][i], eps_hat, f"eps_hat at t={t}")

    # the whole chain run by the reference from the same x_T (errors accumulate in the bound)
    xs, x0s, epss, _ = reference_sample(method, schedule, key, **kw)
    for i in range(S):
        assert_within_bound(traj["x"][i + 1], xs[i + 1], f"trajectory x[{i + 1}]")
        assert_within_bound(traj["x0"][i], x0s[i], f"trajectory x0[{i}]")
        assert_within_bound(traj["eps"][i], epss[i], f"trajectory eps[{i}]")
    assert_within_bound(x0, xs[-1], "final sample")


def test_no_noise_at_the_last_step():
    """With a model whose x̂_0 is a constant c (read as parameterisation 'x0'), every method's
    last step x_1 -> x_0 lands on c whatever x_1 is: μ̃_1(x_1, c) = c (c_0(1) = 1, c_t(1) = 0),
    √ᾱ_0 = 1 and √(1 − ᾱ_0) = 0, so any noise left in the last step would show as √β_1·z
    (β_1 = 1e-3: |√β_1 z| ~ 0.03) for 'xprev_noise' and 'eps_ddpm' with 'beta'. Two keys give
    different x_1 (the earlier steps are noisy) and the same x_0. ('x0_fresh' and 'eps_ddpm' with
    β̃_1 = 0 add nothing at t = 1 by their coefficients; the step-for-step test covers them.)

    Tolerance: 'eps_ddpm' goes through ε̂ = (x_1 − √ᾱ_1 c)/√(1 − ᾱ_1) and back,
    μ = (x_1 − β_1/√(1 − ᾱ_1) ε̂)/√α_1 ≈ c; about 8 roundings of relative size u on terms of size
    |x_1| + |c| (the x_1 parts cancel), so |x_0 − c| ≤ 32u(|x_1| + |c|) leaves a 4x margin and is
    ~1e-6, far below the 0.03 of a stray noise term (measured: ≤ 2.1u(|x_1| + |c|)). The other
    methods are exact up to float32(c) − c (products with 1 and 0; measured ≤ 0.6u(…))."""
    c = CONST_X0
    cases = [("xprev_noise", {}), ("eps_ddpm", {"ddpm_variance": "beta"}), ("ddim", {"num_steps": 7, "eta": 1.0})]
    for method, kw in cases:
        x1s = []
        for seed in (0, 1):
            x0, traj = sampler(method, model="const_x0", **kw)(jax.random.PRNGKey(seed))
            x1 = np.asarray(traj["x"][-2], np.float64)
            tol = 32 * U32 * (np.abs(x1) + c)
            assert np.all(np.abs(np.asarray(x0, np.float64) - c) <= tol), (method, kw, np.abs(np.asarray(x0) - c).max())
            x1s.append(x1)
        assert np.all(x1s[0] != x1s[1]), (method, kw)  # the state before the last step is random


def test_ddim_eta0_all_steps_equals_eps_det_exactly():
    """'ddim' with eta 0 and S = T is 'eps_det' bit for bit: σ = 0·(…) = 0 exactly, σ·z = 0,
    and √(fl((√(1 − ᾱ))²)) = fl(√(1 − ᾱ)) exactly in IEEE binary arithmetic with correctly
    rounded sqrt, so both scans evaluate the same floats."""
    for seed in (0, 1):
        key = jax.random.PRNGKey(seed)
        a, traj_a = sampler("eps_det")(key)
        b, traj_b = sampler("ddim", eta=0.0)(key)  # num_steps None = T
        c, _ = sampler("ddim", eta=0.0, num_steps=T_SMALL)(key)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        for k in ("x", "x0", "eps", "t"):
            np.testing.assert_array_equal(np.asarray(traj_a[k]), np.asarray(traj_b[k]))


# --------------------------------------------------------------------------------------------
# Determinism, argument validation, DDIM steps, batching.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,kw", [("eps_ddpm", {}), ("ddim", {"num_steps": 7, "eta": 0.5}), ("x0_coherent", {})])
def test_same_key_same_samples_different_key_different(method, kw):
    draw = lambda seed: np.asarray(sampler(method, **kw)(jax.random.PRNGKey(seed))[0])
    a, b, c = draw(3), draw(3), draw(4)
    np.testing.assert_array_equal(a, b)
    # continuous draws: two keys agree on an entry with probability 0
    assert np.all(a != c)


def _never_called(x, t):
    raise AssertionError("model_fn was traced: the arguments should have been rejected first")


T_ERR = 10


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "euler"}, r"unknown sampling method 'euler'"),
        ({"method": "ddim", "eta": -0.1}, r"eta must be in \[0, 1\]"),
        ({"method": "ddim", "eta": 1.5}, r"eta must be in \[0, 1\]"),
        ({"method": "ddim", "num_steps": 0}, r"num_steps must be an integer in 1\.\.T"),
        ({"method": "ddim", "num_steps": T_ERR + 1}, r"num_steps must be an integer in 1\.\.T"),
        ({"method": "ddim", "num_steps": 2.5}, r"num_steps must be an integer"),
        ({"method": "ddim", "num_steps": 5.0}, r"num_steps must be an integer"),
        ({"method": "ddim", "num_steps": True}, r"num_steps must be an integer"),
        ({"method": "eps_ddpm", "num_steps": 5}, r"needs one of"),
        ({"method": "xprev_det", "num_steps": 5}, r"needs one of"),
        ({"method": "eps_det", "parameterisation": "score"}, r"unknown parameterisation 'score'"),
        ({"method": "eps_ddpm", "ddpm_variance": "learned"}, r"unknown ddpm_variance 'learned'"),
    ],
)
def test_bad_arguments_raise_before_tracing(kw, match):
    schedule = schedules.make_schedule("linear", T_ERR)
    with pytest.raises(ValueError, match=match):
        sampling.sample(_never_called, schedule, (2, 3), jax.random.PRNGKey(0), **kw)


def test_valid_edge_arguments_are_accepted():
    """The boundaries of the valid ranges: eta 0 and 1, num_steps 1 and T (NumPy integers too),
    num_steps = T for a non-DDIM method, an explicit native parameterisation. (Traced only.)"""
    schedule = schedules.make_schedule("linear", T_ERR)
    m = jax_model("eps")
    for kw in ({"method": "ddim", "eta": 0.0, "num_steps": 1}, {"method": "ddim", "eta": 1.0, "num_steps": np.int64(T_ERR)},
               {"method": "eps_ddpm", "num_steps": T_ERR}, {"method": "eps_det", "parameterisation": "eps"}):
        out = jax.eval_shape(lambda k: sampling.sample(m, schedule, (2, 3), k, **kw), jax.random.PRNGKey(0))  # noqa: B023
        assert out.shape == (2, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize("T,S", [(1, 1), (2, 1), (2, 2), (20, 1), (20, 7), (20, 19), (20, 20), (7, 6), (10, 3),
                                 (1000, 1), (1000, 50), (1000, 999), (1000, 1000)])
def test_ddim_timesteps(T, S):
    taus = sampling.ddim_timesteps(T, S)
    assert taus.shape == (S,) and np.issubdtype(taus.dtype, np.integer)
    assert taus[-1] == T
    if S == 1:
        np.testing.assert_array_equal(taus, [T])  # one step: T -> 0 (the docstring's S = 1 case)
    else:
        assert taus[0] == 1
        assert np.all(np.diff(taus) > 0)  # strictly increasing, so every step is distinct
        # evenly spread: rounding τ_i = round(1 + (i−1)d), d = (T−1)/(S−1), moves each by ≤ 1/2,
        # so consecutive gaps are within 1 of d
        gaps = np.diff(taus)
        d = (T - 1) / (S - 1)
        assert np.all(np.abs(gaps - d) <= 1.0)
    if S == T:
        np.testing.assert_array_equal(taus, np.arange(1, T + 1))


@pytest.mark.parametrize("num", [10, 8, 3])
def test_sample_in_batches(num):
    B = 4
    sample_fn = sampler("eps_ddpm", shape=(B, 3), trajectory=False)
    key = jax.random.PRNGKey(11)
    out = sampling.sample_in_batches(sample_fn, num, B, key, progress=False)
    assert isinstance(out, np.ndarray) and out.shape == (num, 3)
    n_batches = -(-num // B)
    expected = np.concatenate([np.asarray(sample_fn(jax.random.fold_in(key, i))) for i in range(n_batches)])[:num]
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------------------------
# Gaussian data N(m, s²) with the exact optimal denoiser: every sampler is then a linear-Gaussian
# chain whose output law we can compute exactly, so the Monte Carlo checks compare the samples
# with that law (5 SE), and the "allowance" (how far the law is from N(m, s²)) is a computed
# number with a derivation, not a guess.
# --------------------------------------------------------------------------------------------

T_G = 1000  # linear β 1e-4..0.02: the fine steps of Ho et al.
N_G = 20_000  # samples; 4 pixels, one (m, s) each
M_G = np.array([0.5, -1.0, 0.0, 1.5])
S_G = np.array([0.1, 0.5, 1.0, 2.0])  # s < 1, = 1 and > 1 (the β / β̃ ordering flips at s = 1)
KEY_G = jax.random.PRNGKey(2024)


class GaussianChain:
    """The schedule by hand in float64 and the per-pixel quantities of Gaussian data.

    x_t ~ N(√ᾱ_t m, v_t), v_t = ᾱ_t s² + 1 − ᾱ_t; the optimal ε̂ = √(1 − ᾱ_t)(x_t − √ᾱ_t m)/v_t.
    """

    def __init__(self):
        self.beta = np.concatenate([[0.0], np.linspace(1e-4, 0.02, T_G)])
        self.alpha = 1.0 - self.beta
        log_abar = np.cumsum(np.log1p(-self.beta))
        self.abar = np.exp(log_abar)
        self.one_minus = -np.expm1(log_abar)
        self.v = self.abar[:, None] * S_G**2 + self.one_minus[:, None]  # (T+1, 4)
        self.post_var = np.zeros(T_G + 1)  # β̃_t
        self.post_var[1:] = self.beta[1:] * self.one_minus[:-1] / self.one_minus[1:]
        # The eps_ddpm mean with the optimal ε̂ is affine: μ = a_t x_t + b_t with
        # a_t = (1 − β_t/v_t)/√α_t (= √α_t v_{t−1}/v_t), b_t = β_t √ᾱ_t m/(√α_t v_t).
        a = (1.0 - self.beta[1:, None] / self.v[1:]) / np.sqrt(self.alpha[1:, None])
        b = self.beta[1:, None] * np.sqrt(self.abar[1:, None]) * M_G / (np.sqrt(self.alpha[1:, None]) * self.v[1:])
        self.a = np.vstack([np.ones((1, 4)), a])
        self.b = np.vstack([np.zeros((1, 4)), b])
        self.G = np.cumprod(self.a, axis=0)  # G[t] = ∂x_0/∂x_t = a_1 ⋯ a_t

    def ddpm_law(self, step_var, last_var=0.0):
        """x_0 = G_T x_T + Σ_t g_t z_t + Σ_t G_{t−1} b_t with g_t = G_{t−1} σ_t (t ≥ 2; the last
        step adds ``last_var``, 0 for the sampler), x_T ~ N(0, 1): returns (mean, var, g)."""
        step_var = np.broadcast_to(np.asarray(step_var, np.float64).reshape(T_G + 1, -1), (T_G + 1, 4))
        mean = np.sum(self.G[:-1] * self.b[1:], axis=0)
        g = np.zeros((T_G + 1, 4))
        g[2:] = self.G[1:-1] * np.sqrt(step_var[2:])
        return mean, self.G[T_G] ** 2 + np.sum(g**2, axis=0) + last_var, g

    def ddim_affine(self, num_steps):
        """DDIM (eta 0) with the optimal denoiser maps x_T to x_0 = A x_T + B. With
        y_t = x_t − √ᾱ_t m, one step τ -> τ' is y_τ' = k y_τ,
        k = (√(ᾱ_τ' ᾱ_τ) s² + √((1 − ᾱ_τ')(1 − ᾱ_τ)))/v_τ = √(v_τ'/v_τ) cos(θ_τ − θ_τ'),
        where (√ᾱ_t s, √(1 − ᾱ_t)) = √v_t (cos θ_t, sin θ_t). The √v factors telescope, so
        A = s/√v_T · ∏ cos Δθ and B = m − A √ᾱ_T m. The exact flow has k* = √(v_τ'/v_τ); the
        discretisation multiplies the sd by ∏ cos Δθ ∈ [1 − ½ΣΔθ², 1] (Cauchy–Schwarz: DDIM
        always shrinks), and since cos(a + b) < cos a cos b on (0, π/2), refining the steps
        strictly reduces the shrinkage. Returns (A, B, ½ΣΔθ², k-product computed step by step)."""
        taus = np.concatenate([[0], np.arange(1, T_G + 1) if num_steps == T_G else
                               np.round(np.linspace(1, T_G, num_steps)).astype(int)])
        theta = np.arctan2(np.sqrt(self.one_minus)[:, None], np.sqrt(self.abar)[:, None] * S_G)
        dtheta = np.diff(theta[taus], axis=0)
        A = S_G / np.sqrt(self.v[T_G]) * np.prod(np.cos(dtheta), axis=0)
        B = M_G - A * np.sqrt(self.abar[T_G]) * M_G
        k = 1.0
        for tau, tau_prev in zip(taus[:0:-1], taus[-2::-1]):
            k = k * (np.sqrt(self.abar[tau_prev] * self.abar[tau]) * S_G**2
                     + np.sqrt(self.one_minus[tau_prev] * self.one_minus[tau])) / self.v[tau]
        return A, B, 0.5 * np.sum(dtheta**2, axis=0), k


@functools.cache
def gaussian_chain():
    return GaussianChain()


@functools.cache
def gaussian_samples(method, **kw):
    schedule = schedules.make_schedule("linear", T_G, beta_start=1e-4, beta_end=0.02)
    model_fn = analytic.gaussian_data_denoiser(schedule, jnp.asarray(M_G, jnp.float32), jnp.asarray(S_G, jnp.float32), "eps")
    return np.asarray(sampling.sample(model_fn, schedule, (N_G, 4), KEY_G, method=method, **kw), np.float64)


def _assert_mc(x, mean, var, what):
    """Sample mean and variance of x (N, 4) within 5 SE of the law (mean, var) per pixel."""
    n = x.shape[0]
    se_mean = np.sqrt(var / n)
    se_var = var * np.sqrt(2.0 / (n - 1))
    z_mean = (x.mean(0) - mean) / se_mean
    z_var = (x.var(0, ddof=1) - var) / se_var
    assert np.all(np.abs(z_mean) < 5) and np.all(np.abs(z_var) < 5), (what, z_mean, z_var)


def test_gaussian_chain_derivation_is_exact():
    """Sanity of the laws used below, independently of the sampler: with the *true* reverse
    variance σ*_t² = β̃_t + c_0(t)² Var[x_0|x_t] at every step (t = 1 included) each step is the
    exact Gaussian reverse q(x_{t−1}|x_t), so the chain reproduces N(m, s²) except for the prior
    mismatch x_T ~ N(0, 1) ≠ N(√ᾱ_T m, v_T), which it carries with the gain G_T = √ᾱ_T s²/v_T:
    mean m − G_T √ᾱ_T m, variance s² + G_T² (1 − v_T) (float64 algebra: 1e-12). And the two
    forms of the DDIM gain agree."""
    g = gaussian_chain()
    c0 = np.ones(T_G + 1)
    c0[2:] = np.sqrt(g.abar[1:-1]) * g.beta[2:] / g.one_minus[2:]
    var_x0 = S_G**2 * g.one_minus[:, None] / g.v  # Var[x_0 | x_t]
    mean, var, _ = g.ddpm_law(g.post_var[:, None] + c0[:, None] ** 2 * var_x0, last_var=var_x0[1])
    G_T = np.sqrt(g.abar[T_G]) * S_G**2 / g.v[T_G]
    np.testing.assert_allclose(g.G[T_G], G_T, rtol=1e-12)
    np.testing.assert_allclose(mean, M_G - G_T * np.sqrt(g.abar[T_G]) * M_G, rtol=0, atol=1e-12)
    np.testing.assert_allclose(var, S_G**2 + G_T**2 * (1.0 - g.v[T_G]), rtol=1e-12)
    for S in (T_G, 50):
        A, _, _, k = g.ddim_affine(S)
        np.testing.assert_allclose(A, k, rtol=1e-12)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_gaussian_eps_ddpm_reproduces_the_data(variance):
    """'eps_ddpm' with the exact ε̂ on N(m, s²): the samples follow the chain's exact law (5 SE),
    and that law is N(m, s²) up to a computed allowance.

    Mean: the mean map does not depend on σ_t, so the bias is the exact chain's prior mismatch,
    −ᾱ_T m s²/v_T: |bias| ≤ 2.5e-4 (m = 1.5, s = 2), i.e. < 0.02 SE.
    Sd: σ_t² = β̃_t is the smallest possible reverse variance (σ*_t² = β̃_t + c_0² Var[x_0|x_t]),
    and the last step adds nothing where the truth adds Var[x_0|x_1], so 'posterior' is too narrow:
    computed sd/s − 1 = −3.7 %, −0.78 %, −0.45 %, −0.32 % for s = 0.1, 0.5, 1, 2 (largest where
    Var[x_0|x_1] ≈ β_1 is largest relative to s²). β_t ≥ σ*_t² iff s ≤ 1 (σ*² = β_t exactly at
    s = 1), so 'beta' is too wide for s < 1: +0.77 %, +0.15 %, −0.005 %, −0.12 %. The allowance
    asserted on the computed law is 5 % ('posterior') and 1 % ('beta') of s."""
    g = gaussian_chain()
    x = gaussian_samples("eps_ddpm", ddpm_variance=variance)
    step_var = g.post_var if variance == "posterior" else g.beta
    mean, var, _ = g.ddpm_law(step_var)
    _assert_mc(x, mean, var, f"eps_ddpm/{variance} vs its exact law")

    prior_bias = g.abar[T_G] * M_G * S_G**2 / g.v[T_G]
    np.testing.assert_allclose(mean - M_G, -prior_bias, rtol=1e-9, atol=1e-15)
    sd_dev = np.sqrt(var) / S_G - 1.0
    if variance == "posterior":
        assert np.all(sd_dev < 0) and np.all(sd_dev > -0.05), sd_dev
    else:
        assert np.all(np.abs(sd_dev) < 0.01), sd_dev
        assert np.all(sd_dev[S_G < 1] > 0) and np.all(sd_dev[S_G > 1] < 0), sd_dev
    # hence, directly against the data: within 5 SE plus the allowance
    se_mean, se_sd = S_G / np.sqrt(N_G), S_G / np.sqrt(2.0 * (N_G - 1))  # SE(sd) = SE(var)/(2σ)
    assert np.all(np.abs(x.mean(0) - M_G) <= 5 * se_mean + np.abs(prior_bias))
    assert np.all(np.abs(x.std(0, ddof=1) - S_G) <= 5 * se_sd + np.abs(sd_dev) * S_G)


def test_gaussian_beta_variance_widens_the_samples():
    """'beta' injects σ_t² = β_t > β̃_t at every t ≥ 2 through the same mean map, so its output
    variance exceeds 'posterior''s by ΔV = Σ_t G_{t−1}² (β_t − β̃_t) > 0. Both runs share x_T and
    every z_t (same key), so the difference of the two sample variances has the small SE
    √(2 (V_b² + V_p² − 2 C²)/N), C = Cov(x_0^beta, x_0^post) = G_T² + Σ g_t^beta g_t^post
    (Gaussian sample-variance covariance 2C²/N). ΔV is 53–78 of those SEs, so the direction is
    resolved; the measured ΔV must lie within 5 SE of the prediction."""
    g = gaussian_chain()
    _, v_post, g_post = g.ddpm_law(g.post_var)
    _, v_beta, g_beta = g.ddpm_law(g.beta)
    dv = v_beta - v_post
    cov = g.G[T_G] ** 2 + np.sum(g_post * g_beta, axis=0)
    se = np.sqrt(2.0 * (v_beta**2 + v_post**2 - 2.0 * cov**2) / N_G)
    assert np.all(dv > 5 * se), (dv, se)
    emp = gaussian_samples("eps_ddpm", ddpm_variance="beta").var(0, ddof=1) - gaussian_samples("eps_ddpm").var(0, ddof=1)
    assert np.all(emp > 0), emp
    assert np.all(np.abs(emp - dv) < 5 * se), ((emp - dv) / se)
    # and, for s < 1, the truth lies between them (σ*² between β̃ and β), per the computed laws
    lo = S_G < 1
    assert np.all(v_post[lo] < S_G[lo] ** 2) and np.all(S_G[lo] ** 2 < v_beta[lo])


@pytest.mark.parametrize("num_steps", [T_G, 50])
def test_gaussian_ddim_reproduces_the_data(num_steps):
    """DDIM, eta 0, with the exact ε̂: x_0 = A x_T + B exactly (see GaussianChain.ddim_affine).

    1. Sample by sample, against A x_T + B with x_T = normal(split(key)[0]): only float32 rounding
       separates them. Each step is ~10 operations whose roundings (≤ u relative) act on terms
       of size |x_t| + |m| + s and reach x_0 with a gain of order one relative to that scale, so
       |error| ≤ 10 u S (|A x_T + B| + |m| + s); measured at most 0.06 u S (S = 1000) and
       0.26 u S (S = 50).
    2. Against N(m, s²) with 5 SE plus the allowance: mean bias = prior mismatch A √ᾱ_T m
       (≤ 0.019 for m = 1.5, s = 2; it is not forgotten by a deterministic flow), sd bias
       ≤ s (½ΣΔθ² + |1 − 1/√v_T|) from the bound ∏ cos Δθ ≥ 1 − ½ΣΔθ². Computed sd/s − 1:
       S = 1000: −1.7 %, −0.30 %, −0.19 %, −0.16 %; S = 50: −21.8 %, −5.6 %, −3.7 %, −3.0 %
       for s = 0.1, 0.5, 1, 2 (coarse uniform strides near t = 0 are what hurt small s).
    """
    g = gaussian_chain()
    A, B, half_sum_dtheta2, _ = g.ddim_affine(num_steps)
    x = gaussian_samples("ddim", num_steps=num_steps)
    x_T = np.asarray(jax.random.normal(jax.random.split(KEY_G)[0], (N_G, 4)), np.float64)
    pred = A * x_T + B
    assert np.all(np.abs(x - pred) <= 10 * U32 * num_steps * (np.abs(pred) + np.abs(M_G) + S_G))

    prior = np.abs(1.0 - 1.0 / np.sqrt(g.v[T_G]))
    assert np.all(A <= S_G * (1 + prior)) and np.all(S_G - A <= S_G * (half_sum_dtheta2 + prior)), (A / S_G - 1)
    np.testing.assert_allclose(B - M_G, -A * np.sqrt(g.abar[T_G]) * M_G, rtol=1e-12)
    _assert_mc(x, B, A**2, f"ddim/{num_steps} vs its exact law")
    se_mean, se_sd = S_G / np.sqrt(N_G), S_G / np.sqrt(2.0 * (N_G - 1))
    assert np.all(np.abs(x.mean(0) - M_G) <= 5 * se_mean + np.abs(B - M_G))
    assert np.all(np.abs(x.std(0, ddof=1) - S_G) <= 5 * se_sd + S_G * (half_sum_dtheta2 + prior))


def test_gaussian_ddim_more_steps_smaller_error():
    """Refinement shrinks the DDIM sd deficit (cos(a + b) < cos a cos b): A_50 < A_1000 < s. The
    two runs push the same x_T through affine maps, so the ratio of their sample sds is
    A_50/A_1000 up to float32 rounding (the bound of the test above, ≤ 1e-3 relative here),
    with no Monte Carlo error at all."""
    g = gaussian_chain()
    A_full, _, _, _ = g.ddim_affine(T_G)
    A_50, _, _, _ = g.ddim_affine(50)
    assert np.all(A_50 < A_full) and np.all(A_full < S_G)
    sd_full = gaussian_samples("ddim", num_steps=T_G).std(0)
    sd_50 = gaussian_samples("ddim", num_steps=50).std(0)
    assert np.all(sd_50 < sd_full)
    np.testing.assert_allclose(sd_50 / sd_full, A_50 / A_full, rtol=1e-3)
    assert np.all(np.abs(sd_50 - S_G) > np.abs(sd_full - S_G))


def test_sampling_tags_tell_options_apart():
    """Output directories are named by sampling_tag: options that draw different samples must
    not share a name (a posterior-variance run once overwrote the β-variance samples)."""
    from ddpm_jax.runs import sampling_tag

    opts = [dict(method="eps_ddpm", ddpm_variance="beta", clip_x0=None),
            dict(method="eps_ddpm", ddpm_variance="posterior", clip_x0=None),
            dict(method="eps_ddpm", ddpm_variance="beta", clip_x0=(0.0, 1.0)),
            dict(method="ddim", num_steps=50, eta=0.0, clip_x0=None),
            dict(method="ddim", num_steps=50, eta=1.0, clip_x0=None),
            dict(method="ddim", num_steps=20, eta=0.0, clip_x0=None)]
    tags = [sampling_tag(o) for o in opts]
    assert tags[:2] == ["eps_ddpm", "eps_ddpm_posterior"] and tags[3] == "ddim_steps50_eta0"
    assert len(set(tags)) == len(tags)
