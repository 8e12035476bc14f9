"""Random draws that accept one key or one key per example.

With one key, a draw of shape ``(B, ...)`` depends on B: split the batch differently and every
example sees different noise. With a *batch of keys* (one per example, e.g.
``per_example_keys(key, example_ids)``), example i's draws depend only on its own key, so the same
global batch gives bit-identical noise on one device, on a sharded mesh, or under ``pmap`` where
each device holds a slice. The training step uses this; research code can ignore it.

A "batch of keys" is a raw uint32 key array of shape ``(B, 2)`` (``jax.random.PRNGKey`` style) or
a typed key array of shape ``(B,)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["is_key_batch", "per_example_keys", "split", "normal", "randint", "run_keys"]


def run_keys(seed: int):
    """A run's four base keys from its ``config.seed``: ``(init, train, sample, eval)`` — the
    network's initialisation, the training steps, the sample grids and the evaluation."""
    init, train, sample, evaluation = jax.random.split(jax.random.PRNGKey(seed), 4)
    return init, train, sample, evaluation


def is_key_batch(key) -> bool:
    """True if ``key`` holds one key per example (shape ``(B, 2)`` raw, or ``(B,)`` typed)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def per_example_keys(key, example_ids):
    """One key per example: ``fold_in(key, id)`` for each global example index ``id``.

    Args: key: one PRNG key; example_ids: int ``(B,)``. Returns: a batch of B keys.
    """
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)


def split(key):
    """``jax.random.split(key)`` for one key or elementwise for a batch. Returns (k1, k2)."""
    if is_key_batch(key):
        pairs = jax.vmap(jax.random.split)(key)
        return pairs[:, 0], pairs[:, 1]
    k1, k2 = jax.random.split(key)
    return k1, k2


def normal(key, shape, dtype=jnp.float32):
    """Standard normal draws of ``shape`` = (B, ...); per-example when ``key`` is a batch."""
    if is_key_batch(key):
        return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(key)
    return jax.random.normal(key, tuple(shape), dtype)


def randint(key, batch_size: int, minval: int, maxval: int):
    """Integers uniform on [minval, maxval), shape ``(batch_size,)`` int32; per-example for a batch."""
    if is_key_batch(key):
        return jax.vmap(lambda k: jax.random.randint(k, (), minval, maxval, dtype=jnp.int32))(key)
    return jax.random.randint(key, (batch_size,), minval, maxval, dtype=jnp.int32)
