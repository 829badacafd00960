"""Dropless top-k mixture of experts: route -> permute -> grouped matmul -> unpermute.

Notation: ``N`` tokens, ``E`` experts, ``k`` experts per token, ``D`` model width, ``F``
expert hidden width, ``P`` independent expert sets (token positions of a Sparse-Pertoken MoE;
each set has its own router and experts, and routes its own ``N`` tokens).

- :func:`route` -- top-k gates, expert ids, group sizes, load statistics.
- :func:`permute` / :func:`unpermute` -- sort the ``N*k`` token copies by expert and back,
  with the weighted combine in fp32 (both backward passes are gathers, see below).
- :func:`grouped_matmul` -- ``out[m] = x[m] @ w[g(m)]`` over expert-sorted rows.
- :func:`expert_slots` -- each token's selected experts computed once and left uncombined
  (``[N, k, D]``), for callers that weight them several ways (SMES's tasks,
  :mod:`recjax.layers.multitask`); an expert id ``E`` marks an empty slot that costs nothing.
- :func:`moe_ffn` -- the SwiGLU expert layer built from them, with the gate and up weights
  stored pre-concatenated as ``w_gate_up [.., D, 2, F]`` (``[.., D, 2F]`` in memory: no copy
  per call; the size-2 axis keeps each hidden unit's gate and up column on the same device
  when ``F`` is split over devices).
- :func:`moe_ffn_flops` -- analytic forward FLOPs.

Nothing is dropped: there is no capacity factor, every token reaches its ``k`` experts.

Implementations (``impl``):

- ``"reference"`` -- the spec. ``grouped_matmul``: a dense masked einsum (every row times
  every expert's weight, the row's own group selected). ``moe_ffn``: each token's ``k``
  experts' weights gathered and applied to it.
- ``"xla"`` -- ``grouped_matmul`` is ``jax.lax.ragged_dot``; ``moe_ffn`` is permute ->
  ragged_dot -> unpermute, ``vmap``-ed over ``P``. XLA's CPU lowering of ``ragged_dot`` (jax
  0.10.2) is a dense masked product over all groups: it does ``E`` times the active FLOPs
  (``cost_analysis`` reports the same; pinned by a test).
- ``"dense"`` (``moe_ffn`` only) -- no permutation: every expert on every token, then the
  sparse ``[N, E]`` gate matrix applied to the hidden activations before the down projection
  (the sum over experts happens inside one contraction over ``(E, F)``, fp32 accumulation).
  Exact; ``E/k`` times the expert FLOPs.
- ``"pallas"`` / ``"interpret"`` -- the Triton grouped GEMM of
  :mod:`recjax.kernels.grouped_matmul_pallas` (``interpret`` runs it on any backend, slowly).
  ``moe_ffn`` folds ``P`` into the group axis (group ``p*E + e``): the per-set expert-sorted
  rows, laid out set after set, are already sorted by that group id, so each layer is one
  kernel launch over ``P*E`` groups.
- ``"tokamax"`` -- ``tokamax.ragged_dot`` (optional dependency: ``pip install 'recjax[tokamax]'``;
  0.0.12 works with jax 0.10.2 on Python 3.11, later releases need jax >= 0.11 and Python >=
  3.12), which picks its fastest implementation for the backend (Mosaic GPU, then Triton, then
  XLA; only XLA lowers on CPU) for the forward and the backward products alike; ``moe_ffn``
  folds ``P`` into the groups as for ``pallas``. ``grouped_matmul`` also takes one
  implementation per pass, ``impl=(forward, dx, dw)``.
- ``"auto"`` -- ``pallas`` on GPU; ``xla`` on TPU (native ragged dot, not measured here).
  On CPU, ``grouped_matmul`` uses ``reference`` and ``moe_ffn`` uses ``xla`` for ``k == 1``
  and ``dense`` for ``k >= 2``. Measured on 2 shared CPU cores (1024 tokens, D=64, F=128, fp32,
  best of 7 interleaved ``moe_ffn`` forward+backward runs): k=1 -- xla 143/549/1162 ms vs
  dense 229/762/1516 ms at E=8/32/64; k=2 -- dense 183/575 ms vs xla 271/768 ms at E=8/32;
  at k=4 :func:`recjax.bench.moe.bench_moe` shows dense 2.3-2.8x faster. CPU ``ragged_dot``
  already does the dense work (above), so ``dense`` wins once the ``N*k`` sorted rows
  outnumber the ``N`` tokens. For ``grouped_matmul`` alone (same benchmark), the masked
  einsum's forward+backward was faster at 7 of 9 shapes (up to 1.9x) although ragged_dot's
  forward alone was 1.3-3.3x faster with 2.8-3.7x less compiled memory. Timings on shared
  cores are noisy; rerun the benchmark to re-decide.

Sharding. Under GSPMD (``jax.jit`` on sharded inputs, ``AxisType.Auto`` mesh) ``P`` and ``N``
may be sharded. ``dense`` and ``reference`` partition without moving tokens (the backward
only all-reduces the ``[P, E]`` expert counts; a test pins that ``dense`` has no all-gather).
Routing uses a sort along ``E`` instead of ``lax.top_k``, which GSPMD would replicate. The
``xla`` path sorts along ``N``, so XLA all-gathers each set's tokens over the ``N`` axis.
The Pallas kernel is a custom call XLA cannot partition: its operands would be gathered. Models
call :func:`recjax.kernels.moe_parallel.moe_ffn_sharded` under a multi-device mesh instead: the
layer runs per device inside ``shard_map``, experts split over devices by an all-to-all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from recjax.kernels.grouped_matmul_pallas import (
    GmmConfig,
    grouped_matmul_pallas,
    grouped_swiglu_pallas,
)

Gate = Literal["softmax", "relu"]
GmmImpl = Literal["auto", "pallas", "interpret", "xla", "tokamax", "reference"]
MoeImpl = Literal["auto", "pallas", "interpret", "xla", "tokamax", "dense", "reference"]
_GMM_IMPLS = ("auto", "pallas", "interpret", "xla", "tokamax", "reference")
_MOE_IMPLS = ("auto", "pallas", "interpret", "xla", "tokamax", "dense", "reference")


def _backend() -> str:
    return jax.default_backend()


# --------------------------------------------------------------------------------------- route


class Routing(NamedTuple):
    """Output of :func:`route` for logits ``[..., N, E]``.

    weights:     ``[..., N, k]`` fp32 gates of the selected experts (differentiable).
    expert_ids:  ``[..., N, k]`` int32, in descending logit order.
    group_sizes: ``[..., E]`` int32 token copies per expert; sums to ``N*k``.
    stats:       ``expert_fraction [..., E]``, ``router_prob [..., E]`` (fp32, no gradient)
                 and ``load_balance_loss`` (scalar fp32, mean over the leading dims,
                 differentiable through ``router_prob``).
    """

    weights: jax.Array
    expert_ids: jax.Array
    group_sizes: jax.Array
    stats: dict[str, jax.Array]


def route(logits: jax.Array, k: int, *, gate: Gate = "softmax") -> Routing:
    """Top-``k`` routing of ``logits [..., N, E]`` (computed in fp32).

    Gates: ``"softmax"`` -- softmax over the ``k`` selected logits (TokenMixer-Large SP-MoE);
    ``"relu"`` -- ReLU of the selected logits. Ties pick the lower expert id.

    Switch load-balancing loss, per expert set::

        f_e = (number of the N*k token->expert assignments that go to e) / (N*k)
        P_e = mean over the N tokens of softmax(all E logits)_e
        load_balance_loss = E * sum_e f_e * P_e

    ``f`` carries no gradient (counts), ``P`` does, so the loss pushes router probability
    mass away from overloaded experts. It is 1.0 when both ``f`` and ``P`` are uniform
    (``E * E * 1/E^2``), and at most ``E``. With leading dims (``P`` expert sets) the loss
    is the mean over them.
    """
    if logits.ndim < 2:
        raise ValueError(f"route: logits must be [..., N, E], got shape {logits.shape}")
    n, e = logits.shape[-2:]
    if not 1 <= k <= e:
        raise ValueError(f"route: k={k} must be between 1 and the number of experts E={e}")
    if gate not in ("softmax", "relu"):
        raise ValueError(f"route: gate must be 'softmax' or 'relu', got {gate!r}")
    logits = logits.astype(jnp.float32)
    top, ids = top_k(logits, k)
    weights = jax.nn.softmax(top, axis=-1) if gate == "softmax" else jax.nn.relu(top)
    onehot = jax.nn.one_hot(ids, e, dtype=jnp.int32)  # [..., N, k, E]
    group_sizes = onehot.sum(axis=(-3, -2))
    fraction = group_sizes.astype(jnp.float32) / max(n * k, 1)
    router_prob = jax.nn.softmax(logits, axis=-1).mean(axis=-2)
    loss = e * jnp.sum(fraction * router_prob, axis=-1)
    stats = {
        "expert_fraction": jax.lax.stop_gradient(fraction),
        "router_prob": jax.lax.stop_gradient(router_prob),
        "load_balance_loss": jnp.mean(loss),
    }
    return Routing(weights, ids.astype(jnp.int32), group_sizes, stats)


def top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest of ``values [..., E]`` and their int32 ids, descending, ties to the
    lower id. A stable sort along ``E`` rather than ``lax.top_k`` (same result and tie order):
    GSPMD replicates top_k's operand when its batch dims are sharded, but partitions a sort."""
    axis = values.ndim - 1
    iota = jax.lax.broadcasted_iota(jnp.int32, values.shape, axis)
    neg, ids = jax.lax.sort((-values, iota), dimension=axis, is_stable=True, num_keys=1)
    return -neg[..., :k], ids[..., :k]


# ------------------------------------------------------------------------ permute / unpermute


class Permutation(NamedTuple):
    """``order[i]``: flat index ``n*k + j`` of the i-th sorted copy; ``inverse[order[i]] = i``."""

    order: jax.Array
    inverse: jax.Array


def permute(x: jax.Array, expert_ids: jax.Array) -> tuple[jax.Array, Permutation]:
    """Sort the ``N*k`` token copies by expert: ``x [N, D]``, ids ``[N, k]`` -> ``[N*k, D]``.

    Row ``i`` of the result is ``x[order[i] // k]``; rows of expert ``e`` are contiguous and in
    token order (stable sort), so with the group sizes of :func:`route` the result is the
    ``x`` of :func:`grouped_matmul`. Backward: ``dx[n] = sum_j dy[inverse[n*k + j]]``, a
    gather (autodiff of the forward gather would be a scatter-add with repeated indices).
    """
    if x.ndim != 2 or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"permute: expected x [N, D] and expert_ids [N, k], "
            f"got {x.shape} and {expert_ids.shape}"
        )
    flat = expert_ids.reshape(-1)
    iota = jnp.arange(flat.shape[0], dtype=jnp.int32)
    _, order = jax.lax.sort((flat, iota), num_keys=1, is_stable=True)
    inverse = jnp.zeros_like(order).at[order].set(iota, unique_indices=True)
    perm = Permutation(order, inverse)
    return _expand(x, perm, expert_ids.shape[1]), perm


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expand(x, perm: Permutation, k: int):
    return x[perm.order // k]


def _expand_fwd(x, perm, k):
    return _expand(x, perm, k), perm


def _expand_bwd(k, perm, dy):
    rows = dy[perm.inverse].astype(jnp.float32).reshape(-1, k, dy.shape[-1])
    return rows.sum(axis=1).astype(dy.dtype), None


_expand.defvjp(_expand_fwd, _expand_bwd)


def unpermute(y: jax.Array, perm: Permutation, weights: jax.Array) -> jax.Array:
    """Weighted combine of expert-sorted rows back to tokens, in fp32.

    ``y [N*k, D]`` (sorted as :func:`permute`), ``weights [N, k]`` ->
    ``out[n] = sum_j weights[n, j] * y[inverse[n*k + j]]`` ``[N, D]`` fp32. With all weights 1
    and ``k == 1`` it inverts :func:`permute`. Backward (gathers only, see :func:`unsort`):
    ``dy[i] = weights.flat[order[i]] * dout[order[i] // k]`` and
    ``dweights[n, j] = <dout[n], y[inverse[n*k + j]]>``.
    """
    if y.ndim != 2 or weights.ndim != 2 or y.shape[0] != weights.size:
        raise ValueError(
            f"unpermute: expected y [N*k, D] and weights [N, k], got {y.shape} and {weights.shape}"
        )
    return jnp.einsum("nkd,nk->nd", unsort(y, perm, weights.shape[1]), weights.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def unsort(y: jax.Array, perm: Permutation, k: int) -> jax.Array:
    """Expert-sorted rows back to their token slots: ``y [N*k, D]`` -> fp32 ``[N, k, D]`` with
    ``out[n, j] = y[inverse[n*k + j]]``. Backward: ``dy = dout.flat[order]``, a gather."""
    return y[perm.inverse].astype(jnp.float32).reshape(-1, k, y.shape[-1])


def _unsort_fwd(y, perm, k):
    return unsort(y, perm, k), (perm, jnp.zeros((0,), y.dtype))  # an empty array carries y's dtype


def _unsort_bwd(k, res, dout):
    perm, like = res
    return dout.reshape(-1, dout.shape[-1])[perm.order].astype(like.dtype), None


unsort.defvjp(_unsort_fwd, _unsort_bwd)


# ------------------------------------------------------------------------------ grouped matmul


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    impl: GmmImpl | tuple[GmmImpl, GmmImpl, GmmImpl] = "auto",
    cfg: GmmConfig | None = None,
) -> jax.Array:
    """``out[m] = x[m] @ w[g(m)]`` for expert-sorted rows: ``x [M, K]``, ``w [G, K, N]``,
    ``group_sizes [G]`` (int) -> ``[M, N]``.

    Group ``g`` owns rows ``sum(group_sizes[:g]) .. sum(group_sizes[:g+1]) - 1``; rows past
    ``sum(group_sizes)`` are zero. Inputs are multiplied in ``x.dtype`` with fp32
    accumulation; the result has ``preferred_element_type`` (default ``x.dtype``).
    Differentiable in ``x`` and ``w``. ``cfg`` tunes the Pallas kernel (block sizes, warps).
    ``impl`` may name one implementation per pass, ``(forward, dx, dw)``, e.g.
    ``("pallas", "pallas", "tokamax")``: each gradient is that implementation's own VJP.
    """
    if isinstance(impl, tuple):
        if len(impl) != 3 or any(i not in _GMM_IMPLS for i in impl):
            raise ValueError(f"grouped_matmul: a per-pass impl is (forward, dx, dw) from {_GMM_IMPLS}, got {impl!r}")
        out_dtype = jnp.dtype(preferred_element_type or x.dtype)
        return _per_pass(x, w.astype(x.dtype), group_sizes, out_dtype, impl, cfg)
    if impl not in _GMM_IMPLS:
        raise ValueError(f"grouped_matmul: impl must be one of {_GMM_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = {"gpu": "pallas", "tpu": "xla"}.get(_backend(), "reference")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    w = w.astype(x.dtype)
    if impl in ("pallas", "interpret"):
        cfg = dataclasses.replace(cfg or GmmConfig(), interpret=impl == "interpret")
        return grouped_matmul_pallas(x, w, group_sizes, preferred_element_type=out_dtype, cfg=cfg)
    if impl == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=out_dtype)
    if impl == "tokamax":
        return _tokamax().ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=out_dtype)
    return _grouped_matmul_reference(x, w, group_sizes, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _per_pass(x, w, group_sizes, out_dtype, impls, cfg):
    return grouped_matmul(x, w, group_sizes, preferred_element_type=out_dtype, impl=impls[0], cfg=cfg)


def _per_pass_fwd(x, w, group_sizes, out_dtype, impls, cfg):
    return _per_pass(x, w, group_sizes, out_dtype, impls, cfg), (x, w, group_sizes)


def _per_pass_bwd(out_dtype, impls, cfg, res, dy):
    x, w, group_sizes = res
    gmm = lambda impl: lambda x, w: grouped_matmul(x, w, group_sizes, preferred_element_type=out_dtype,
                                                   impl=impl, cfg=cfg)
    dx = jax.vjp(lambda x: gmm(impls[1])(x, w), x)[1](dy)[0]
    dw = jax.vjp(lambda w: gmm(impls[2])(x, w), w)[1](dy)[0]
    return dx, dw, None


_per_pass.defvjp(_per_pass_fwd, _per_pass_bwd)


def _tokamax():
    try:
        import tokamax
        from absl import flags
    except ImportError as err:
        raise ImportError("grouped_matmul(impl='tokamax') needs the tokamax package: "
                          "pip install 'recjax[tokamax]' (or use impl='auto')") from err
    # tokamax reads its absl flags on first use and, if nobody parsed them, parses sys.argv,
    # which fails on any program's own arguments (recjax's, pytest's): keep the defaults
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _grouped_matmul_reference(x, w, group_sizes, out_dtype):
    """Dense masked einsum: every row times every group's weight, own group selected."""
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
    mask = jax.nn.one_hot(row_group, w.shape[0], dtype=jnp.float32)  # zero past the last group
    full = jnp.einsum("mk,gkn->gmn", x, w, preferred_element_type=jnp.float32)
    return jnp.einsum("mg,gmn->mn", mask, full).astype(out_dtype)


# ------------------------------------------------------------------------------------ moe_ffn


def resolve_moe_impl(impl: str, k: int) -> str:
    """The implementation ``moe_ffn(impl=...)`` runs for top-``k`` routing on this backend."""
    if impl not in _MOE_IMPLS:
        raise ValueError(f"moe_ffn: impl must be one of {_MOE_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return {"gpu": "pallas", "tpu": "xla"}.get(_backend(), "xla" if k == 1 else "dense")


def moe_ffn(x, router_w, w_gate_up, w_down, k, *, gate="softmax", scale=1.0, impl="auto"):
    """Top-``k`` SwiGLU mixture of experts, dropless.

    Shapes (batched over ``P`` expert sets; the unbatched forms drop the ``P`` axis)::

        x [P, N, D], router_w [P, D, E], w_gate_up [P, E, D, 2, F] (W_gate = [..., 0, :],
        W_up = [..., 1, :]), w_down [P, E, F, D]

    Equations, per set::

        logits = x @ router_w                                    (fp32)
        g, ids = route(logits, k, gate=gate)
        y[n]   = scale * sum_{j<k} g[n,j] * W_down[ids[n,j]] (silu(x[n] W_gate[ids[n,j]])
                                                               * (x[n] W_up[ids[n,j]]))

    Matmuls run in ``x.dtype`` with fp32 accumulation, the SwiGLU product in fp32 (cast to
    ``x.dtype`` before the down projection), the combine over ``k`` in fp32; ``y`` has ``x``'s
    dtype and shape. Returns ``(y, stats)`` with the stats of :func:`route`
    (``expert_fraction`` and ``router_prob`` ``[P, E]`` or ``[E]``, no gradient;
    ``load_balance_loss`` a scalar, mean over ``P``, differentiable to the router).

    ``impl``: see the module docstring. ``P`` is never a Python loop: ``vmap`` for
    ``xla``, batched einsums for ``dense``/``reference``, folded into the group axis for
    ``pallas``/``interpret``/``tokamax``. ``pallas`` fuses the SwiGLU into the gate/up grouped
    GEMM (:func:`recjax.kernels.grouped_matmul_pallas.grouped_swiglu_pallas`).
    """
    unbatched = x.ndim == 2
    if unbatched:
        x, router_w, w_gate_up, w_down = (a[None] for a in (x, router_w, w_gate_up, w_down))
    check_moe_shapes(x, router_w, w_gate_up, w_down)
    impl = resolve_moe_impl(impl, k)
    logits = jnp.einsum("pnd,pde->pne", x.astype(jnp.float32), router_w.astype(jnp.float32))
    r = route(logits, k, gate=gate)
    y = expert_ffn(x, r, w_gate_up.astype(x.dtype), w_down.astype(x.dtype), impl)
    y = (scale * y).astype(x.dtype)
    stats = dict(r.stats)
    if unbatched:
        y = y[0]
        stats["expert_fraction"] = stats["expert_fraction"][0]
        stats["router_prob"] = stats["router_prob"][0]
    return y, stats


def check_moe_shapes(x, router_w, w_gate_up, w_down):
    p, n, d = x.shape if x.ndim == 3 else (None,) * 3
    e = router_w.shape[-1] if router_w.ndim == 3 else None
    f = w_gate_up.shape[-1] if w_gate_up.ndim == 5 else None
    expected = {
        "x": (x, (p, n, d)),
        "router_w": (router_w, (p, d, e)),
        "w_gate_up": (w_gate_up, (p, e, d, 2, f)),
        "w_down": (w_down, (p, e, f, d)),
    }
    for name, (arr, shape) in expected.items():
        if None in shape or arr.shape != shape:
            raise ValueError(
                "moe_ffn: expected x [P, N, D], router_w [P, D, E], w_gate_up [P, E, D, 2, F], "
                "w_down [P, E, F, D] (or all without P); got "
                + ", ".join(f"{k} {a.shape}" for k, (a, _) in expected.items())
                + f" ({name} does not fit)"
            )


def _swiglu(h: jax.Array, f: int) -> jax.Array:
    """``silu(h[..., :f]) * h[..., f:]`` in fp32 for ``h = x @ [W_gate | W_up]``."""
    h = h.astype(jnp.float32)
    return jax.nn.silu(h[..., :f]) * h[..., f:]


def expert_ffn(x, r: Routing, w_gate_up, w_down, impl: str) -> jax.Array:
    """The expert part of :func:`moe_ffn` for a resolved ``impl`` (not ``"auto"``): ``x [P, N,
    D]``, routing ``r``, weights in ``x.dtype`` -> fp32 ``sum_j g[n,j] Expert_{ids[n,j]}(x[n])``
    ``[P, N, D]``. An expert id equal to ``E`` marks an empty copy: it is computed by no expert
    and contributes zero (the expert-parallel receive buffers use it for unfilled slots)."""
    ffn = {"dense": _moe_dense, "reference": _moe_reference}.get(impl, _moe_sorted)
    return ffn(x, r, w_gate_up, w_down, impl)


def _moe_sorted(x, r: Routing, w_gate_up, w_down, impl):
    """:func:`expert_slots`, then the weighted combine over each token's ``k`` slots (fp32)."""
    slots = expert_slots(x, r.expert_ids, r.group_sizes, w_gate_up, w_down, impl)
    return jnp.einsum("pnkd,pnk->pnd", slots, r.weights.astype(jnp.float32))


def expert_slots(x, expert_ids, group_sizes, w_gate_up, w_down, impl: str) -> jax.Array:
    """Each token's selected experts, each computed once, uncombined: permute -> grouped matmul
    (gate|up, SwiGLU fused for pallas) -> grouped matmul -> :func:`unsort`.

    ``x [P, N, D]``, ``expert_ids [P, N, k]`` int32 (``E`` marks an empty slot: no expert
    computes it and it is zero), ``group_sizes [P, E]`` (the non-empty slots per expert; their
    sum is the number of rows the grouped matmuls compute), weights as :func:`moe_ffn`, ``impl``
    a :func:`grouped_matmul` implementation (not ``auto``) -> fp32
    ``out [P, N, k, D]`` with ``out[p, n, j] = Expert_{ids[p,n,j]}(x[p, n])``.
    """
    p, n, d = x.shape
    e, f = w_gate_up.shape[1], w_gate_up.shape[-1]
    k = expert_ids.shape[-1]
    w_gu = w_gate_up.reshape(p, e, d, 2 * f)  # [gate | up] columns, no copy
    if impl == "xla":
        xs, perm = jax.vmap(permute)(x, expert_ids)  # [P, N*k, D]; empty copies (id E) last
        gmm = functools.partial(grouped_matmul, preferred_element_type=jnp.float32, impl="xla")
        h = jax.vmap(gmm)(xs, w_gu, group_sizes)
        o = jax.vmap(gmm)(_swiglu(h, f).astype(x.dtype), w_down, group_sizes)
        return jax.vmap(unsort, in_axes=(0, 0, None))(o, perm, k)
    # one launch over P*E groups: rows sorted by p*E + e, empty copies after all of them
    sets = jnp.arange(p, dtype=jnp.int32)[:, None, None]
    key = jnp.where(expert_ids < e, sets * e + expert_ids, p * e).reshape(p * n, k)
    xs, perm = permute(x.reshape(p * n, d), key)
    gs = group_sizes.reshape(p * e)
    w_gu = w_gu.reshape(p * e, d, 2 * f)
    if impl in ("pallas", "interpret"):
        cfg = GmmConfig(interpret=impl == "interpret")
        a = grouped_swiglu_pallas(xs, w_gu, gs, preferred_element_type=x.dtype, cfg=cfg)
    else:
        h = grouped_matmul(xs, w_gu, gs, preferred_element_type=jnp.float32, impl=impl)
        a = _swiglu(h, f).astype(x.dtype)
    o = grouped_matmul(a, w_down.reshape(p * e, f, d), gs, preferred_element_type=jnp.float32, impl=impl)
    return unsort(o, perm, k).reshape(p, n, k, d)


def _moe_dense(x, r: Routing, w_gate_up, w_down, impl):
    """Every expert on every token; the sparse gate matrix ``[P, N, E]`` scales the hidden."""
    e = w_gate_up.shape[1]
    gates = jnp.einsum("pnke,pnk->pne", jax.nn.one_hot(r.expert_ids, e), r.weights)
    h = jnp.einsum("pnd,pedcf->pnecf", x, w_gate_up, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(h[..., 0, :]) * h[..., 1, :] * gates[..., None]).astype(x.dtype)
    return jnp.einsum("pnef,pefd->pnd", a, w_down, preferred_element_type=jnp.float32)


def _moe_reference(x, r: Routing, w_gate_up, w_down, impl):
    """Each token's k experts' weights gathered (``[P, N, k, ...]``) and applied to it."""
    take = jax.vmap(lambda w, ids: w[ids])  # per set: [E, ...] indexed by [N, k]
    f32 = jnp.float32
    h = jnp.einsum("pnd,pnkdcf->pnkcf", x, take(w_gate_up, r.expert_ids), preferred_element_type=f32)
    a = (jax.nn.silu(h[..., 0, :]) * h[..., 1, :]).astype(x.dtype)
    o = jnp.einsum("pnkf,pnkfd->pnkd", a, take(w_down, r.expert_ids), preferred_element_type=f32)
    return jnp.einsum("pnk,pnkd->pnd", r.weights, o)


# -------------------------------------------------------------------------------------- FLOPs


def moe_ffn_flops(n_tokens: int, d: int, f: int, e: int, k: int, *, impl: str = "active") -> int:
    """Forward matmul FLOPs of :func:`moe_ffn` over ``n_tokens`` tokens (all sets together).

    Per token: router ``2*D*E`` plus three ``D x F`` matmuls (gate, up, down) per expert run,
    ``2*D*F`` FLOPs each: ``k`` experts for ``"active"`` and the sparse paths (``"xla"``,
    ``"pallas"``, ``"interpret"``, ``"reference"``), all ``E`` for ``"dense"`` (``"auto"``
    resolves as in :func:`moe_ffn`). Elementwise
    work (SiLU, gates, combine) is not counted. This is the algorithm's count: on CPU the
    ``"xla"`` path's ``ragged_dot`` executes ``E`` times its expert FLOPs (see module doc).
    """
    if impl != "active":
        impl = resolve_moe_impl(impl, k)
    experts_run = e if impl == "dense" else k
    return n_tokens * (2 * d * e + experts_run * 3 * 2 * d * f)
