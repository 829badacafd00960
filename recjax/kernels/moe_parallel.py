"""``moe_ffn`` partitioned by ``jax.shard_map``: expert sets, tokens and experts over mesh axes.

Shapes as in :func:`recjax.kernels.moe.moe_ffn`: ``x [P, N, D]`` (``P`` expert sets of ``N``
tokens), ``router_w [P, D, E]``, ``w_gate_up [P, E, D, 2, F]``, ``w_down [P, E, F, D]``. GSPMD
cannot partition the sorted paths (a Pallas custom call, a sort along ``N``), so the layer runs
per device inside ``shard_map`` with explicit collectives:

- ``P`` over ``set_axes`` and ``N`` over ``token_axes``: every set's router and experts are
  local to the devices holding the set, every token is routed and computed where it lives.
  Only the routing statistics are reduced (``pmean`` of the per-expert fractions and router
  probabilities over the token axes; the switch loss ``E sum_e f_e P_e`` is formed from the
  reduced ones, so it equals the unpartitioned loss).
- ``E`` over ``expert_axes`` (expert parallelism, ``S`` shards of ``E_l = E / S`` experts,
  tokens split over the same devices): each device routes its ``n`` tokens, buckets the
  ``n k`` token copies by the shard owning their expert (``dest = e // E_l``; rank within the
  bucket by a cumulative count), and ``all_to_all`` sends the ``[S, C, D]`` buckets; the owner
  sorts what it received by local expert, runs the grouped matmuls over its ``E_l`` experts
  (the copies are its tokens, ``k = 1``), and a second ``all_to_all`` returns ``[S, C, D]``
  outputs (in ``x``'s dtype), which are combined with the gates where the tokens live (fp32). ``C`` is ``n k``
  (dropless, the default) or ``ceil(f n k / S)`` for a capacity factor ``f``; copies past
  ``C`` contribute zero and are counted (``dropped``). MaxText's MoE does the same with
  ``ragged_all_to_all``, which XLA:CPU lacks (jax 0.10.2), so the fixed-capacity form is the
  one every test runs.

Weights enter ``shard_map`` split over the set and expert axes only: an FSDP (``embed``) or
tensor (``mlp``) split is gathered at the call, as FSDP does for any layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from recjax.kernels import moe as moe_kernels
from recjax.parallel.table_exchange import capacity


def _divide(name: str, size: int, axes: tuple[str, ...], mesh: Mesh) -> int:
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    if size % shards:
        raise ValueError(f"moe_ffn_sharded: {name}={size} is not divisible by the {shards} shards of "
                         f"mesh axes {axes}; change the mesh or the model/batch size")
    return shards


def moe_ffn_sharded(x, router_w, w_gate_up, w_down, k, *, mesh: Mesh, set_axes=(), token_axes=(),
                    expert_axes=(), gate="softmax", scale=1.0, impl="auto", capacity_factor=0.0):
    """:func:`recjax.kernels.moe.moe_ffn` over ``mesh`` (see the module docstring).

    Returns ``(y, stats)`` as ``moe_ffn`` does (``y`` like ``x``; ``expert_fraction`` and
    ``router_prob`` ``[P, E]``, ``load_balance_loss`` scalar) plus ``dropped``: int32 token
    copies that did not fit the all-to-all capacity, each token counted once (0 without expert
    parallelism or when dropless). Unbatched inputs (no ``P``) are accepted as in ``moe_ffn``.
    """
    unbatched = x.ndim == 2
    if unbatched:
        x, router_w, w_gate_up, w_down = (a[None] for a in (x, router_w, w_gate_up, w_down))
    moe_kernels.check_moe_shapes(x, router_w, w_gate_up, w_down)
    set_axes, token_axes, expert_axes = tuple(set_axes), tuple(token_axes), tuple(expert_axes)
    _divide("P (expert sets)", x.shape[0], set_axes, mesh)
    tokens_local = x.shape[1] // _divide("N (tokens)", x.shape[1], token_axes, mesh)
    n_ep = _divide("E (experts)", w_gate_up.shape[1], expert_axes, mesh)
    cap = capacity(tokens_local * k, n_ep, capacity_factor)

    P = PartitionSpec
    sets = set_axes or None
    experts = expert_axes or None
    in_specs = (P(sets, token_axes or None, None), P(sets, None, None), P(sets, experts, None, None, None),
                P(sets, experts, None, None))
    out_specs = (P(sets, token_axes or None, None), P(sets, None), P(sets, None), P(), P())

    def local(x, router_w, w_gate_up, w_down):
        logits = jnp.einsum("pnd,pde->pne", x.astype(jnp.float32), router_w.astype(jnp.float32))
        r = moe_kernels.route(logits, k, gate=gate)
        wgu, wd = w_gate_up.astype(x.dtype), w_down.astype(x.dtype)
        if expert_axes:
            y, dropped = _expert_parallel(x, r, wgu, wd, expert_axes, cap, impl)
        else:
            y = moe_kernels.expert_ffn(x, r, wgu, wd, moe_kernels.resolve_moe_impl(impl, k))
            dropped = jnp.zeros((), jnp.int32)
        e = logits.shape[-1]
        frac, prob = r.stats["expert_fraction"], r.stats["router_prob"]
        if token_axes:
            frac, prob = jax.lax.pmean(frac, token_axes), jax.lax.pmean(prob, token_axes)
        # the loss from the reduced statistics, with router_prob's gradient (route's formula)
        prob_grad = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=-2)
        if token_axes:
            prob_grad = jax.lax.pmean(prob_grad, token_axes)
        loss = jnp.mean(e * jnp.sum(frac * prob_grad, axis=-1))
        if set_axes:
            loss = jax.lax.pmean(loss, set_axes)
        if set_axes + token_axes:  # devices holding the same tokens count their drops once
            dropped = jax.lax.psum(dropped, set_axes + token_axes)
        return (scale * y).astype(x.dtype), frac, prob, loss, dropped

    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    y, frac, prob, loss, dropped = fn(x, router_w, w_gate_up, w_down)
    if unbatched:
        y, frac, prob = y[0], frac[0], prob[0]
    return y, {"expert_fraction": frac, "router_prob": prob, "load_balance_loss": loss, "dropped": dropped}


def _expert_parallel(x, r: moe_kernels.Routing, w_gate_up, w_down, axes, cap, impl):
    """Per device: ``x [P, n, D]`` local tokens, ``r`` their routing over all ``E`` experts,
    local experts ``w_* [P, E_l, ...]`` -> (``[P, n, D]`` fp32 combined outputs, int32 copies
    dropped on this device)."""
    p, n, d = x.shape
    k = r.expert_ids.shape[-1]
    e_l = w_gate_up.shape[1]
    shards = jax.lax.axis_size(axes)
    ids = r.expert_ids.reshape(p, n * k)
    dest, local_expert = ids // e_l, ids % e_l
    onehot = jax.nn.one_hot(dest, shards, dtype=jnp.int32)  # [P, nk, S]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=1) - onehot, dest[..., None], axis=2)[..., 0]
    fits = rank < cap
    slot = jnp.where(fits, dest * cap + rank, shards * cap)  # shards * cap: dropped
    copy = jnp.broadcast_to(jnp.arange(n * k, dtype=jnp.int32), (p, n * k))
    rows = jnp.arange(p)[:, None]
    src = jnp.full((p, shards * cap), -1, jnp.int32).at[rows, slot].set(copy, mode="drop")  # copy per slot
    filled = src >= 0
    src = jnp.maximum(src, 0)
    send_x = jnp.where(filled[..., None], jnp.take_along_axis(x, (src // k)[..., None], axis=1), 0)
    send_e = jnp.where(filled, jnp.take_along_axis(local_expert, src, axis=1), e_l)  # e_l: empty slot

    def exchange(a):  # [P, S * cap, ...] -> the same layout, bucket s now from/to device s
        split = a.reshape(p, shards, cap, *a.shape[2:])
        return jax.lax.all_to_all(split, axes, 1, 1, tiled=True).reshape(a.shape)

    recv_x, recv_e = exchange(send_x), exchange(send_e)
    valid = recv_e < e_l
    one = moe_kernels.Routing(
        weights=valid[..., None].astype(jnp.float32),
        expert_ids=recv_e[..., None],
        group_sizes=jax.nn.one_hot(recv_e, e_l, dtype=jnp.int32).sum(axis=1),  # empty slots in none
        stats={},
    )
    out = moe_kernels.expert_ffn(recv_x, one, w_gate_up, w_down, moe_kernels.resolve_moe_impl(impl, 1))
    back = exchange(out.astype(x.dtype))
    mine = jnp.take_along_axis(back, jnp.minimum(slot, shards * cap - 1)[..., None], axis=1)
    mine = jnp.where(fits[..., None], mine, 0).astype(jnp.float32).reshape(p, n, k, d)
    y = jnp.einsum("pnkd,pnk->pnd", mine, r.weights)
    return y, jnp.sum(~fits, dtype=jnp.int32)
