"""Training state, optimiser and EMA.

``TrainState`` holds everything a run needs to continue bit for bit: params, optimiser state,
EMA params, the step and the run's base PRNG key (per-step keys are ``fold_in(rng, step)``;
the data position is a function of the step, see :mod:`ddpm_jax.data`), and two optional parts
that only some configs have (None otherwise): the importance sampler's history of loss terms
(``train.t_sampling='importance'``, :mod:`ddpm_jax.timestep_sampling`) and the power EMAs tracked
for post-hoc EMA (``train.ema_snapshot_sigma_rels``, :mod:`ddpm_jax.ema`), a dict
``{sigma_rel key: params}``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax.models import param_labels

__all__ = ["TrainState", "OPTIONAL_FIELDS", "track_key", "make_lr_schedule", "make_optimizer", "create_train_state", "ema_decay_at", "ema_update"]


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (updates applied so far); params, opt_state, ema_params: pytrees;
    rng: the run's base key, uint32 ``(2,)``; t_history: a ``timestep_sampling.History`` or None;
    ema_tracks: ``{track_key(σ_rel): params}`` or None."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jnp.ndarray
    t_history: Any = None
    ema_tracks: Any = None


#: The fields a state may lack (None): which ones a run has depends on its config.
OPTIONAL_FIELDS = ("t_history", "ema_tracks")


def track_key(sigma_rel: float) -> str:
    """The ``ema_tracks`` key of the power EMA of width ``sigma_rel`` (e.g. 'sigma_rel_0.05')."""
    return f"sigma_rel_{float(sigma_rel):g}"


def make_lr_schedule(base_lr: float, *, steps_per_epoch: int, decay_factor: float = 0.1, decay_every_epochs: int = 0,
                     warmup_steps: int = 0, anneal_steps: int = 0) -> optax.Schedule:
    """Step decay or linear annealing, with optional linear warm-up.

    lr(s) = base_lr · decay_factor^⌊s / (decay_every_epochs · steps_per_epoch)⌋ (the notebook's
    StepLR(step_size=20 epochs, gamma=0.1)); ``anneal_steps`` > 0 instead: lr(s) = base_lr ·
    max(0, 1 − s / anneal_steps) (progressive distillation's per-stage schedule). During the first
    ``warmup_steps`` steps it rises linearly from 0 and the decay clock starts after warm-up.
    ``decay_every_epochs=0`` and ``anneal_steps=0``: constant.
    """
    if decay_every_epochs > 0 and anneal_steps > 0:
        raise ValueError("decay_every_epochs and anneal_steps are two schedules: set one of them")
    if anneal_steps > 0:
        decayed = optax.linear_schedule(base_lr, 0.0, anneal_steps)
    elif decay_every_epochs > 0:
        decayed = optax.exponential_decay(
            base_lr, transition_steps=decay_every_epochs * steps_per_epoch, decay_rate=decay_factor, staircase=True
        )
    else:
        decayed = optax.constant_schedule(base_lr)
    if warmup_steps > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup_steps), decayed], [warmup_steps])
    return decayed


def make_optimizer(optim_config, *, steps_per_epoch: int, params) -> optax.GradientTransformation:
    """Adam with per-group learning rates (``optax.multi_transform``).

    Groups (:func:`ddpm_jax.models.param_labels`): 'net' at ``optim.learning_rate``, 'rho' (the
    ρ-head scalars) at ``optim.rho_learning_rate`` (the notebook: 0.01 vs 0.2), 'frozen' (the
    fixed Fourier features) never updated. Optional global-norm clipping first.
    """
    c = optim_config

    def adam(lr):
        sched = make_lr_schedule(
            lr, steps_per_epoch=steps_per_epoch, decay_factor=c.decay_factor,
            decay_every_epochs=c.decay_every_epochs, warmup_steps=c.warmup_steps,
            anneal_steps=c.get("anneal_steps", 0),
        )
        return optax.adam(sched, b1=c.b1, b2=c.b2, eps=c.eps)

    tx = optax.multi_transform(
        {"net": adam(c.learning_rate), "rho": adam(c.rho_learning_rate), "frozen": optax.set_to_zero()},
        param_labels(params),
    )
    if c.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
    return tx


def create_train_state(params, tx: optax.GradientTransformation, rng, *, t_history=None, ema_track_keys=()) -> TrainState:
    """Step 0: EMA params (and each tracked power EMA in ``ema_track_keys``) start equal to the
    params; ``t_history``: the importance sampler's empty history, or None."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        rng=jnp.asarray(rng, jnp.uint32),
        t_history=t_history,
        ema_tracks={k: jax.tree_util.tree_map(jnp.copy, params) for k in ema_track_keys} or None,
    )


def ema_decay_at(step, decay: float):
    """Warmed-up EMA decay min(decay, (1 + step)/(10 + step)), so early EMA params are not
    dominated by the random initialisation (a 0.999 EMA keeps 60 % of the init after 500 steps)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    """ema ← decay · ema + (1 − decay) · params, leaf by leaf."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def fit_to_saved(state: TrainState, saved: dict) -> TrainState:
    """``state`` (or its abstract form) with the optional fields made to match a checkpoint's:
    a field the checkpoint lacks becomes None; one it holds is built from the saved shapes
    (``saved``: :meth:`ddpm_jax.checkpointing.Checkpointer.saved_fields`), so a checkpoint restores
    whatever options it was trained with. ``saved`` empty (unreadable metadata): unchanged."""
    if not saved:
        return state
    from ddpm_jax.timestep_sampling import History  # noqa: PLC0415

    def abstract(x):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)

    history = saved.get("t_history")
    if isinstance(history, dict) and {"terms", "count"} <= set(history):
        history = History(terms=abstract(history["terms"]), count=abstract(history["count"]))
    else:
        history = None
    tracks = saved.get("ema_tracks")
    if isinstance(tracks, dict) and tracks:
        like = jax.tree_util.tree_map(abstract, state.params)
        tracks = {k: like for k in tracks}
    else:
        tracks = None
    return state.replace(t_history=history, ema_tracks=tracks)
