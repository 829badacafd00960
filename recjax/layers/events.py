"""Reading the event sequence of the synthetic stream (``event_item``, ``event_type``,
``event_age`` ``[B, L]``, oldest first, ``-1`` / 0 past each example's length): picking the most
recent events and embedding them as rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.layers.token_mixing import fan_in_init, stacked_param
from recjax.parallel.sharding import constrain


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


class EventRows(nnx.Module):
    """Event rows ``s = E_item[i] W_item + E_type[tau] + log1p(age) w_age`` ``[B, L, D]``, zero
    past each example's count ``n``: the item's embedding row, its type and how long ago it
    happened (the age feature is what lets a model weight recent events more; without it a
    tower over the most recent events only sees their order)."""

    def __init__(self, item_dim: int, dim: int, types: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.item_proj = stacked_param(rngs, (item_dim, dim), ("embed", "mlp"), fan_in_init())
        self.type_emb = stacked_param(rngs, (types, dim), (None, None), nnx.initializers.normal(0.02))
        self.age_proj = stacked_param(rngs, (dim,), (None,), nnx.initializers.normal(0.1))

    def __call__(self, items: jax.Array, types: jax.Array, age: jax.Array, n: jax.Array) -> jax.Array:
        """``items [B, L, item_dim]``, ``types [B, L]`` (-1: padding), ``age [B, L]`` hours, ``n [B]``."""
        dt = self.dtype
        s = items.astype(dt) @ self.item_proj[...].astype(dt) + self.type_emb[...].astype(dt)[jnp.maximum(types, 0)]
        s = s + jnp.log1p(jnp.maximum(age, 0.0))[..., None].astype(dt) * self.age_proj[...].astype(dt)
        keep = jnp.arange(s.shape[1])[None, :, None] < n[:, None, None]
        return constrain(jnp.where(keep, s, 0.0), ("batch", None, None))
