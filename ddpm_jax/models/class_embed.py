"""The class conditioning shared by both network families: a learned embedding of the label,
with one extra row for "no class" (``ddpm_jax.guidance.NO_CLASS`` = −1), added to the time
embedding."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["add_class_embedding"]


def add_class_embedding(emb, y, num_classes: int, dtype=jnp.float32):
    """``emb`` ``(B, E)`` + ``Embed(num_classes + 1, E)(y)``, label −1 (or ``y=None``) taking row
    ``num_classes``; call inside a compact module (the submodule is ``class_embed``). With
    ``num_classes = 0`` (an unconditional network) returns ``emb`` unchanged, and labels are an
    error."""
    if num_classes == 0:
        if y is not None:
            raise ValueError("an unconditional network (model.num_classes = 0) was given class labels")
        return emb
    b = emb.shape[0]
    y = jnp.full((b,), -1, jnp.int32) if y is None else jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))
    index = jnp.where(y < 0, num_classes, y)
    return emb + nn.Embed(num_classes + 1, emb.shape[-1], dtype=dtype, name="class_embed")(index).astype(emb.dtype)
