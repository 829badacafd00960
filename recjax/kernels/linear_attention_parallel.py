"""``linear_attention`` partitioned by ``jax.shard_map``: batch, heads and sequence over mesh axes.

GSPMD cannot partition the Pallas kernels (custom calls: their operands would be gathered), so
the op runs per device inside ``shard_map`` on ``q, k [B_l, S_l, H_l, d]``, ``v [B_l, S_l,
H_l, dv]``. Batch and heads are independent: each device calls
:func:`recjax.kernels.linear_attention.linear_attention` on its block. The sequence (shard
``i`` of ``n_s`` holds positions ``[i S_l, (i + 1) S_l)``) needs the key-value state of the
other shards, an exclusive scan of per-shard states::

    U_i    = sum_{s in shard i, s < n_b} phi_k[s]^T v[s]                    fp32 [B_l, H_l, d, dv]
    causal:      out[t] = a (local(t) + phi_q[t] sum_{j < i} U_j)
    non-causal:  out[t] = a (local(t) + phi_q[t] sum_{j != i} U_j)

where ``local`` is the op on the shard alone (its valid length ``clip(n_b - i S_l, 0, S_l)``,
no output factor) and ``a = 1 / max(n_b ** sigmoid(m_h), 1)`` uses the whole length. The scan
is an ``all_gather`` of the ``n_s`` states (``n_s d dv`` floats per (batch, head), far less than
the activations) and a masked sum; its transpose carries the state gradients back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from recjax.kernels.linear_attention import (
    apply_feature_map,
    linear_attention,
    output_factor,
    query_factor,
    valid_lengths,
)


def _shards(mesh: Mesh, axes: tuple[str, ...]) -> int:
    out = 1
    for a in axes:
        out *= mesh.shape[a]
    return out


def linear_attention_sharded(q, k, v, *, mesh: Mesh, batch_axes=(), head_axes=(), seq_axes=(),
                             causal=False, feature_map="cosine", length_scale=None, lengths=None,
                             impl="auto", block_size=None):
    """:func:`recjax.kernels.linear_attention.linear_attention` with ``batch``, ``heads`` and
    ``seq`` split over the given mesh axes (see the module docstring); same arguments and
    result (``[B, S, H, dv]`` in ``v.dtype``)."""
    batch_axes, head_axes, seq_axes = tuple(batch_axes), tuple(head_axes), tuple(seq_axes)
    b, s, h, _ = q.shape
    for name, size, axes in (("batch", b, batch_axes), ("seq", s, seq_axes), ("heads", h, head_axes)):
        if size % _shards(mesh, axes):
            raise ValueError(f"linear_attention_sharded: {name}={size} is not divisible by the "
                             f"{_shards(mesh, axes)} shards of mesh axes {axes}")
    P = PartitionSpec
    bx, sx, hx = batch_axes or None, seq_axes or None, head_axes or None
    n = valid_lengths(lengths, b, s)
    scale = jnp.zeros((h,), jnp.float32) if length_scale is None else length_scale

    def local(q, k, v, n, scale):
        if not seq_axes:
            return linear_attention(q, k, v, causal=causal, feature_map=feature_map,
                                    length_scale=None if length_scale is None else scale,
                                    lengths=None if lengths is None else n, impl=impl, block_size=block_size)
        s_l = q.shape[1]
        index = jax.lax.axis_index(seq_axes)
        n_local = jnp.clip(n - index * s_l, 0, s_l)
        out = linear_attention(q, k, v, causal=causal, feature_map=feature_map, lengths=n_local,
                               impl=impl, block_size=block_size).astype(jnp.float32)
        valid = (jnp.arange(s_l)[None, :] < n_local[:, None])[:, :, None, None]
        pk = jnp.where(valid, apply_feature_map(k.astype(jnp.float32), feature_map), 0.0)
        state = jnp.einsum("bshd,bshe->bhde", pk, jnp.where(valid, v.astype(jnp.float32), 0.0))
        states = jax.lax.all_gather(state, seq_axes, tiled=False)  # [n_s, B_l, H_l, d, dv]
        others = jnp.arange(states.shape[0]) < index if causal else jnp.arange(states.shape[0]) != index
        before = jnp.einsum("j,jbhde->bhde", others.astype(jnp.float32), states)
        pq = apply_feature_map(q.astype(jnp.float32), feature_map) * query_factor(feature_map, q.shape[-1])
        out = out + jnp.einsum("bthd,bhde->bthe", jnp.where(valid, pq, 0.0), before)
        if length_scale is not None:
            out = out * output_factor(n, scale)[:, None, :, None]
        return out.astype(v.dtype)

    fn = jax.shard_map(
        local, mesh=mesh, check_vma=False,
        in_specs=(P(bx, sx, hx, None), P(bx, sx, hx, None), P(bx, sx, hx, None), P(bx), P(hx)),
        out_specs=P(bx, sx, hx, None),
    )
    return fn(q, k, v, n, scale)
