"""Class conditioning and classifier-free guidance (Ho & Salimans, 2022).

A class-conditional network takes labels ``y`` ``(B,)`` int32 in ``0..K-1``, or :data:`NO_CLASS`
(−1) for "no class" (its own learned embedding, index K). Training replaces each label by
:data:`NO_CLASS` with probability ``train.label_dropout`` (:func:`drop_labels`), so one network
learns both f(x, t, c) and f(x, t, ∅). Sampling with guidance w uses

    f̃(x, t, c) = (1 + w) · f(x, t, c) − w · f(x, t, ∅)

for whatever the network predicts (ε, x_0, v, or the ρ-head's reverse mean: the combination is
linear), computed in one forward pass of 2B (:func:`guided_model_fn`). w = 0 is the plain
conditional model; w > 0 trades diversity for fidelity to the class.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import rng

__all__ = ["NO_CLASS", "LABEL_STREAM", "drop_labels", "with_labels", "guided_model_fn", "guide"]

#: The label that means "no class" (the unconditional model).
NO_CLASS = -1

#: Folded into the step's key to derive the label-dropout draws, apart from the noise and dropout.
LABEL_STREAM = 0x6C61626C


def drop_labels(labels, step_key, example_ids, rate: float):
    """``labels`` ``(B,)`` with each replaced by :data:`NO_CLASS` with probability ``rate``; example
    i's draw comes from ``fold_in(fold_in(step_key, LABEL_STREAM), example_ids[i])``, so it does not
    depend on how the batch is split over devices."""
    if rate == 0.0:
        return labels
    keys = rng.per_example_keys(jax.random.fold_in(step_key, LABEL_STREAM), example_ids)
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
    return jnp.where(u < rate, NO_CLASS, labels)


def guide(conditional, unconditional, guidance):
    """(1 + w) · conditional − w · unconditional."""
    return (1.0 + guidance) * conditional - guidance * unconditional


def with_labels(model_fn: Callable, labels) -> Callable:
    """``(x_t, t) -> model_fn(x_t, t, labels)`` for a conditional ``model_fn``; ``model_fn`` itself
    when ``labels`` is None (an unconditional network)."""
    if labels is None:
        return model_fn
    return lambda x_t, t: model_fn(x_t, t, labels)


def guided_model_fn(model_fn: Callable, labels, guidance: float = 0.0) -> Callable:
    """The ``(x_t, t) -> prediction`` that samplers take, from a conditional
    ``model_fn(x_t, t, y)``: ``model_fn(x_t, t, labels)`` for ``guidance = 0``, otherwise
    :func:`guide` of the conditional and unconditional predictions, both from one call on the
    batch of 2B (``x_t`` twice, ``labels`` then :data:`NO_CLASS`).

    ``labels``: int ``(B,)`` (``NO_CLASS`` entries draw unconditionally). ``guidance``: w, a float
    (static) or a traced scalar."""
    labels = jnp.asarray(labels, jnp.int32)
    if isinstance(guidance, (int, float)) and guidance == 0:
        return with_labels(model_fn, labels)

    def fn(x_t, t):
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        both = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                        jnp.concatenate([labels, jnp.full_like(labels, NO_CLASS)]))
        return guide(both[:b], both[b:], guidance)

    return fn
