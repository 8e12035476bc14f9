"""Progressive distillation (Salimans & Ho 2022): a student that takes one DDIM step where its
teacher takes two, stage after stage (128 → 64 → … → 4 steps).

Notation. t ∈ 1..T indexes the schedule as everywhere in the project, and t = 0 is the data
(ᾱ_0 = 1). With α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) (α_0 = 1, σ_0 = 0; this σ_t is the noise
standard deviation of z_t, not :func:`ddpm_jax.step_grids.sigmas`' σ_t/α_t), a noisy point is
z_t = α_t x + σ_t ε, and a network's output of any parameterisation gives the data prediction x̂
(:func:`ddpm_jax.diffusion.x0_eps_from_prediction`).

The deterministic DDIM step (η = 0) from t to s < t with the data prediction x̂ is

    z_s = α_s x̂ + σ_s (z_t − α_t x̂) / σ_t                                     (:func:`ddim_step`)

(at s = 0: z_0 = x̂), the update of ``sampling.sample(method='ddim', eta=0)``.

The target (the paper's Algorithm 2). For a student step t → t'' whose teacher takes the two
steps t → t' → t'':

    x̂_t   = teacher's x̂(z_t, t),           z_{t'}  = α_{t'} x̂_t + σ_{t'} (z_t − α_t x̂_t)/σ_t
    x̂_t'  = teacher's x̂(z_{t'}, t'),       z_{t''} = α_{t''} x̂_t' + σ_{t''} (z_{t'} − α_{t'} x̂_t')/σ_{t'}
    x̃     = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)          (:func:`distillation_target`)

x̃ is the data prediction for which ONE DDIM step t → t'' lands exactly on the teacher's z_{t''}.
The denominator is σ_{t''}(α_{t''}/σ_{t''} − α_t/σ_t) > 0 because the SNR grows as t falls; at the
last step t'' = 0 (α_0 = 1, σ_0 = 0) it is 1 and x̃ = z_0 = x̂_t', the teacher's final prediction.

The loss (:func:`distillation_loss`), the paper's "truncated SNR" weighting on the x-error,

    ℓ = max(SNR_t, 1) · mean_pixels (x̃ − x̂_student(z_t, t))²,      SNR_t = α_t² / σ_t²,

equals max(‖x̃ − x̂‖², ‖ε̃ − ε̂‖²) per pixel (the ε-error is √SNR_t times the x-error at fixed
z_t). The student's x̂ comes from its own parameterisation: 'v' (the paper's choice: x̂ = α_t z_t
− σ_t v), 'x0', or 'eps' (x̂ = (z_t − σ_t ε̂)/α_t, ill-conditioned where α_t is small, i.e. at
t = T, which is why the paper avoids it). The student starts from the teacher's EMA params (the
same network): when its parameterisation differs from the teacher's, the same output head now
means something else and the first stage re-learns it. Teacher predictions are read in the
teacher's own parameterisation, converted to x̂ and optionally clipped to the data range (as the
teacher's own sampler does with ``sampling.clip_x0``); the target carries no gradient.

Training points: t is drawn uniformly from the student's N grid steps, x from the data, and
z_t = α_t x + σ_t ε, from per-example keys ``rng.per_example_keys(fold_in(rng, step),
example_id)`` (as :mod:`ddpm_jax.train_step`), so the draws do not depend on the device layout.

Grids (:func:`stage_grids`). The first teacher takes ``teacher_steps`` = 2N₀ steps on the DDIM
grid of :func:`ddpm_jax.step_grids.ddim_timesteps` (τ_i = round(1 + (i − 1)(T − 1)/(S − 1)), the
grid of ``experiments.sample --method ddim --num_steps S``). That grid does not nest: the points
of S = N are not among those of S = 2N (1 + 2j(T − 1)/(2N − 1) ≠ 1 + j(T − 1)/(N − 1)), so a
teacher of 2N steps on its own grid has no midpoint for a student step on the N grid. The stage
grids are therefore made by halving from the top: grid_N = grid_{2N}[1::2] (ascending; the top
point τ = T is kept, every other point below it is dropped, and the last step goes from grid_N[0]
down to 0). Each student step t = grid_{2N}[2i+1] → t'' = grid_{2N}[2i−1] (0 for i = 0) then has
exactly one teacher midpoint t' = grid_{2N}[2i]. A distilled run records its grid and is sampled
on it (:func:`sample_on_grid`, which ``ddpm_jax.runs.Run.make_sampler`` uses for such a run).

Compute (:data:`FORWARDS_PER_IMAGE`): a training step costs per image two teacher forward passes
and the student's forward and backward pass, counted as three forward passes (as the training
step is counted), five forward-equivalents in all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import diffusion, rng, solvers
from ddpm_jax.diffusion import extract
from ddpm_jax.models import make_model_fn
from ddpm_jax.schedules import Schedule
from ddpm_jax.step_grids import ddim_timesteps
from ddpm_jax.train_state import ema_decay_at, ema_update

__all__ = [
    "STUDENT_PARAMETERISATIONS",
    "FORWARDS_PER_IMAGE",
    "check_stages",
    "stage_sizes",
    "stage_grids",
    "nests",
    "Stage",
    "stage_steps",
    "alpha_sigma",
    "ddim_step",
    "x0_from_model",
    "distillation_target",
    "truncated_snr_weight",
    "draw_training_points",
    "distillation_loss",
    "DistillStepConfig",
    "distill_step",
    "sample_on_grid",
]

#: What a student may predict (the output its x̂ is read from).
STUDENT_PARAMETERISATIONS = ("v", "x0", "eps")

#: Forward-pass equivalents per training image and step: the teacher's two forward passes, and the
#: student's forward and backward pass counted as three forwards.
FORWARDS_PER_IMAGE = {"teacher": 2, "student": 3}


# --------------------------------------------------------------------------------------------------
# Stages and grids
# --------------------------------------------------------------------------------------------------


def check_stages(teacher_steps: int, target_steps: int, num_train_steps: int) -> None:
    """ValueError (one line) unless 1 ≤ target_steps < teacher_steps ≤ T and teacher_steps /
    target_steps is a power of two (each stage halves the steps)."""
    for name, v in (("teacher_steps", teacher_steps), ("target_steps", target_steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"--{name}={v!r}: must be an integer >= 1")
    if target_steps >= teacher_steps:
        raise ValueError(f"--target_steps={target_steps} must be fewer than --teacher_steps={teacher_steps} "
                         "(each stage halves the steps)")
    ratio, rem = divmod(teacher_steps, target_steps)
    if rem or ratio & (ratio - 1):
        raise ValueError(f"--teacher_steps={teacher_steps} must be --target_steps={target_steps} times a power of two "
                         f"(each stage halves the steps), e.g. {target_steps * 2 ** max(1, int(np.log2(max(ratio, 1))))}")
    if teacher_steps > num_train_steps:
        raise ValueError(f"--teacher_steps={teacher_steps} exceeds the teacher's T = {num_train_steps} steps")


def stage_sizes(teacher_steps: int, target_steps: int) -> List[int]:
    """The students' step counts N, stage by stage: [teacher_steps/2, teacher_steps/4, …, target_steps]."""
    out, n = [], teacher_steps
    while n > target_steps:
        n //= 2
        out.append(n)
    return out


def stage_grids(num_train_steps: int, teacher_steps: int, target_steps: int) -> Dict[int, np.ndarray]:
    """``{S: grid}`` for S = teacher_steps, teacher_steps/2, …, target_steps: ascending int32 steps in
    1..T, each with τ_S = T. grid_{teacher_steps} = ``ddim_timesteps(T, teacher_steps)``;
    grid_N = grid_{2N}[1::2] (halving from the top, module docstring)."""
    check_stages(teacher_steps, target_steps, num_train_steps)
    grids = {teacher_steps: ddim_timesteps(num_train_steps, teacher_steps).astype(np.int32)}
    for n in stage_sizes(teacher_steps, target_steps):
        grids[n] = grids[2 * n][1::2].copy()
    return grids


def nests(coarse, fine) -> bool:
    """Whether the grid ``fine`` (2N points) has exactly one point strictly between consecutive
    points of ``coarse`` (N points, with 0 below the lowest) and contains every point of it:
    every student step t → t'' has one teacher midpoint."""
    coarse, fine = np.asarray(coarse), np.asarray(fine)
    if fine.shape[0] != 2 * coarse.shape[0]:
        return False
    return bool(np.array_equal(fine[1::2], coarse) and np.all(np.diff(np.concatenate([[0], fine])) > 0))


@flax.struct.dataclass
class Stage:
    """One stage's student steps, each ``(N,)`` int32, ordered as the grid (ascending t): the
    student step t → t_next (t_next = 0 for the lowest) and the teacher's midpoint t_mid."""

    t: jnp.ndarray
    t_mid: jnp.ndarray
    t_next: jnp.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


def stage_steps(teacher_grid) -> Stage:
    """The :class:`Stage` of a student of N steps under the teacher grid ``teacher_grid`` (ascending,
    2N points): t = grid[1::2], t_mid = grid[0::2], t_next = (0, grid[1::2][:-1])."""
    g = np.asarray(teacher_grid, np.int32)
    if g.ndim != 1 or g.shape[0] % 2 or g.shape[0] < 2 or np.any(np.diff(np.concatenate([[0], g])) <= 0):
        raise ValueError(f"a teacher grid needs an even number >= 2 of increasing steps >= 1, got {g.tolist()}")
    t = g[1::2]
    return Stage(t=jnp.asarray(t), t_mid=jnp.asarray(g[0::2]),
                 t_next=jnp.asarray(np.concatenate([[0], t[:-1]]).astype(np.int32)))


# --------------------------------------------------------------------------------------------------
# The DDIM step and the target
# --------------------------------------------------------------------------------------------------


def alpha_sigma(schedule: Schedule, t, x_shape) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) for t in 0..T ``(B,)``, shaped to broadcast against ``x_shape``
    (t = 0 gives (1, 0))."""
    return extract(schedule.sqrt_alpha_bars, t, x_shape), extract(schedule.sqrt_one_minus_alpha_bars, t, x_shape)


def ddim_step(schedule: Schedule, z_t, t, s, x0_hat):
    """z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t: the DDIM step (η = 0) from t (1..T) to s (0..T, s < t)
    with data prediction ``x0_hat``. Shapes: z_t, x0_hat ``(B, ...)``; t, s ``(B,)``."""
    a_t, s_t = alpha_sigma(schedule, t, z_t.shape)
    a_s, s_s = alpha_sigma(schedule, s, z_t.shape)
    return a_s * x0_hat + s_s * (z_t - a_t * x0_hat) / s_t


def x0_from_model(schedule: Schedule, model_fn: Callable, z_t, t, parameterisation: str, clip_x0=None):
    """x̂ = the data prediction of ``model_fn(z_t, t)`` read in ``parameterisation``, clipped to
    ``clip_x0`` = (lo, hi) when given."""
    x0, _ = diffusion.x0_eps_from_prediction(schedule, z_t, t, model_fn(z_t, t), parameterisation)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, clip_x0[0], clip_x0[1])
    return x0


def distillation_target(schedule: Schedule, teacher_fn: Callable, z_t, t, t_mid, t_next, *,
                        parameterisation: str, clip_x0=None, return_z_next: bool = False):
    """x̃: the data prediction for which one DDIM step t → t_next reaches where the teacher's two
    steps t → t_mid → t_next reach (module docstring). ``teacher_fn(z, t) -> prediction`` in
    ``parameterisation``; shapes z_t ``(B, ...)``, t, t_mid, t_next ``(B,)`` with
    t > t_mid > t_next ≥ 0. With ``return_z_next``, returns (x̃, z_{t_next}). No gradient flows
    through it (``stop_gradient``)."""
    x1 = x0_from_model(schedule, teacher_fn, z_t, t, parameterisation, clip_x0)
    z_mid = ddim_step(schedule, z_t, t, t_mid, x1)
    x2 = x0_from_model(schedule, teacher_fn, z_mid, t_mid, parameterisation, clip_x0)
    z_next = ddim_step(schedule, z_mid, t_mid, t_next, x2)
    a_t, s_t = alpha_sigma(schedule, t, z_t.shape)
    a_n, s_n = alpha_sigma(schedule, t_next, z_t.shape)
    ratio = s_n / s_t
    x_tilde = jax.lax.stop_gradient((z_next - ratio * z_t) / (a_n - ratio * a_t))
    return (x_tilde, jax.lax.stop_gradient(z_next)) if return_z_next else x_tilde


def truncated_snr_weight(schedule: Schedule, t) -> jnp.ndarray:
    """max(SNR_t, 1), ``(B,)`` for t ``(B,)`` in 1..T."""
    return jnp.maximum(schedule.snr[t], 1.0)


def draw_training_points(schedule: Schedule, stage: Stage, x0, keys):
    """(t, t_mid, t_next, z_t): per example, a student step drawn uniformly from the stage's N and
    z_t = α_t x0 + σ_t ε. ``keys``: one per example (:func:`ddpm_jax.rng.per_example_keys`)."""
    k_t, k_eps = rng.split(keys)
    i = rng.randint(k_t, x0.shape[0], 0, stage.t.shape[0])
    t, t_mid, t_next = stage.t[i], stage.t_mid[i], stage.t_next[i]
    z_t = diffusion.q_sample(schedule, x0, t, rng.normal(k_eps, x0.shape, x0.dtype))
    return t, t_mid, t_next, z_t


def distillation_loss(schedule: Schedule, student_fn: Callable, teacher_fn: Callable, x0, keys, stage: Stage, *,
                      student_param: str = "v", teacher_param: str = "eps", teacher_clip_x0=None):
    """Per-example losses ``(B,)`` ℓ_i = max(SNR_t, 1) · mean over pixels of (x̃ − x̂_student)², and
    an aux dict with 't' and 'target' (x̃). ``x0`` ``(B, ...)`` data; ``keys`` one per example."""
    if student_param not in STUDENT_PARAMETERISATIONS:
        raise ValueError(f"unknown student parameterisation {student_param!r}; expected one of {STUDENT_PARAMETERISATIONS}")
    t, t_mid, t_next, z_t = draw_training_points(schedule, stage, x0, keys)
    target = distillation_target(schedule, teacher_fn, z_t, t, t_mid, t_next, parameterisation=teacher_param,
                                 clip_x0=teacher_clip_x0)
    x_hat = x0_from_model(schedule, student_fn, z_t, t, student_param)
    axes = tuple(range(1, x0.ndim))
    per_example = truncated_snr_weight(schedule, t) * jnp.mean(jnp.square(target - x_hat), axis=axes)
    return per_example, {"t": t, "target": target}


# --------------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistillStepConfig:
    """Static pieces of the distillation step (closed over, not traced).

    apply_fn: the student network's ``apply``; teacher_apply_fn: the teacher's (None: the same
    network); tx: the optimiser; ema_decay: the student EMA's decay (warmed up as the training
    step's, :func:`ddpm_jax.train_state.ema_decay_at`); time_input: as the run's config;
    student_param / teacher_param: parameterisations; teacher_clip_x0: (lo, hi) or None.
    """

    apply_fn: Callable
    tx: optax.GradientTransformation
    ema_decay: float
    student_param: str = "v"
    teacher_param: str = "eps"
    teacher_clip_x0: Optional[Tuple[float, float]] = None
    time_input: str = "index"
    teacher_apply_fn: Optional[Callable] = None


def distill_step(cfg: DistillStepConfig, state, teacher_params, schedule: Schedule, stage: Stage, batch):
    """One Adam update of the student on a batch dict (``'image'``, ``'example_id'``, ``'weight'``;
    :func:`ddpm_jax.train_step.as_batch`): loss L = Σ_i weight_i ℓ_i with ℓ from
    :func:`distillation_loss`, keys ``per_example_keys(fold_in(state.rng, state.step), example_id)``.

    ``state``: a :class:`ddpm_jax.train_state.TrainState` (its step counts this stage's updates);
    ``teacher_params``: the teacher's params. Under ``jax.jit`` with the batch sharded over devices
    every example's draws and target are its own, so any device count computes the same update up
    to float summation order. A step with a non-finite loss or gradient changes only ``step``.
    Returns (new state, {'loss', 'grad_norm', 'finite'}).
    """
    T = schedule.num_steps
    keys = rng.per_example_keys(jax.random.fold_in(state.rng, state.step), batch["example_id"])
    teacher_fn = make_model_fn(cfg.teacher_apply_fn or cfg.apply_fn, teacher_params, time_input=cfg.time_input,
                               num_steps=T)

    def loss(p):
        student_fn = make_model_fn(cfg.apply_fn, p, time_input=cfg.time_input, num_steps=T)
        terms, _ = distillation_loss(schedule, student_fn, teacher_fn, batch["image"], keys, stage,
                                     student_param=cfg.student_param, teacher_param=cfg.teacher_param,
                                     teacher_clip_x0=cfg.teacher_clip_x0)
        return jnp.sum(terms * batch["weight"])

    value, grads = jax.value_and_grad(loss)(state.params)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    updates, opt_state = cfg.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    ema = ema_update(state.ema_params, params, ema_decay_at(state.step, cfg.ema_decay))
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params))
    return new_state, {"loss": value, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


# --------------------------------------------------------------------------------------------------
# Sampling on a recorded grid
# --------------------------------------------------------------------------------------------------


def sample_on_grid(model_fn: Callable, schedule: Schedule, grid: Sequence[int], shape, key, *,
                   parameterisation: str, clip_x0=None, return_trajectory: bool = False):
    """DDIM (η = 0) from z_T ~ N(0, I) down the ascending ``grid`` (S steps, the top one T) to 0:
    S network evaluations, one ``lax.scan``. z_T uses ``split(key)[0]`` as
    :func:`ddpm_jax.sampling.sample` does, so on ``grid = ddim_timesteps(T, S)`` it draws what
    ``sample(method='ddim', num_steps=S, eta=0)`` draws from the same key (to float rounding).

    Returns z_0 ``shape``; with ``return_trajectory`` also the trajectory dict of
    :func:`ddpm_jax.solvers.trajectory` ('t', 'x', 'x0', 'eps').
    """
    grid = jnp.asarray(grid, jnp.int32)
    ts = grid[::-1]
    t_next = jnp.concatenate([jnp.zeros((1,), jnp.int32), grid[:-1]])[::-1]
    z_T = jax.random.normal(jax.random.split(key)[0], tuple(shape), jnp.float32)
    B = shape[0]

    def step(z, pair):
        t = jnp.full((B,), pair[0], jnp.int32)
        s = jnp.full((B,), pair[1], jnp.int32)
        x0 = x0_from_model(schedule, model_fn, z, t, parameterisation, clip_x0)
        z_s = ddim_step(schedule, z, t, s, x0)
        eps = diffusion.predict_eps_from_x0(schedule, z, t, x0)
        return z_s, ((z_s, x0, eps) if return_trajectory else None)

    z0, outs = jax.lax.scan(step, z_T, (ts, t_next))
    return (z0, solvers.trajectory(ts, z_T, outs)) if return_trajectory else z0
