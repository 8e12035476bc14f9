"""Training state, optimiser and EMA.

``TrainState`` holds everything a run needs to continue bit for bit: params, optimiser state,
EMA params, the step and the run's base PRNG key (per-step keys are ``fold_in(rng, step)``;
the data position is a function of the step, see :mod:`ddpm_jax.data`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax.models import param_labels

__all__ = ["TrainState", "make_lr_schedule", "make_optimizer", "create_train_state", "ema_decay_at", "ema_update"]


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (updates applied so far); params, opt_state, ema_params: pytrees;
    rng: the run's base key, uint32 ``(2,)``."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jnp.ndarray


def make_lr_schedule(base_lr: float, *, steps_per_epoch: int, decay_factor: float = 0.1, decay_every_epochs: int = 0, warmup_steps: int = 0) -> optax.Schedule:
    """Step decay with optional linear warm-up.

    lr(s) = base_lr · decay_factor^⌊s / (decay_every_epochs · steps_per_epoch)⌋ (the notebook's
    StepLR(step_size=20 epochs, gamma=0.1)); during the first ``warmup_steps`` steps it rises
    linearly from 0 and the decay clock starts after warm-up. ``decay_every_epochs=0``: constant.
    """
    if decay_every_epochs > 0:
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
        )
        return optax.adam(sched, b1=c.b1, b2=c.b2, eps=c.eps)

    tx = optax.multi_transform(
        {"net": adam(c.learning_rate), "rho": adam(c.rho_learning_rate), "frozen": optax.set_to_zero()},
        param_labels(params),
    )
    if c.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
    return tx


def create_train_state(params, tx: optax.GradientTransformation, rng) -> TrainState:
    """Step 0: EMA params start equal to the params."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        rng=jnp.asarray(rng, jnp.uint32),
    )


def ema_decay_at(step, decay: float):
    """Warmed-up EMA decay min(decay, (1 + step)/(10 + step)), so early EMA params are not
    dominated by the random initialisation (a 0.999 EMA keeps 60 % of the init after 500 steps)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    """ema ← decay · ema + (1 − decay) · params, leaf by leaf."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
