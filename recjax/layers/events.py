"""Reading the event sequence of the synthetic stream (``event_item``, ``event_type``,
``event_age`` ``[B, L]``, oldest first, ``-1`` / 0 past each example's length)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def most_recent(valid: jax.Array, length: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The ``length`` most recent positions where ``valid [B, L]``, most recent first and
    valid ones first; returns each of ``arrays`` gathered ``[B, length, ...]`` and the counts
    ``n [B]`` int32 (positions past ``n`` hold padding)."""
    L = valid.shape[1]
    pos = jnp.arange(L)[None, :]
    order = jnp.argsort(jnp.where(valid, L - pos, 2 * L + pos), axis=1)[:, :length]
    n = jnp.minimum(jnp.sum(valid, axis=1), length).astype(jnp.int32)
    picked = tuple(jnp.take_along_axis(a, order.reshape(*order.shape, *([1] * (a.ndim - 2))), axis=1)
                   for a in arrays)
    return (*picked, n)
