"""Multi-task expert mixtures over a shared representation: MMoE, PLE and SMES (MODELS.md 6),
and what every multi-task model ends with: per-task towers and the logits' shape.

Each mixture maps ``x [N, D]`` to one input per task tower, ``[T, N, D]``. Experts are
SwiGLU FFNs in the layout of :mod:`recjax.kernels.moe` (``w_gate_up [E, D, 2, F]``,
``w_down [E, F, D]``), ``f_e(x) = W_down,e (silu(x W_gate,e) * (x W_up,e))``, so the three
mixtures differ only in which experts an example runs and how the tasks weight them:

- **MMoE** (Ma et al., 2018): every expert on every example; task ``t`` mixes them with
  ``g_t = softmax(x W_t)``: ``out_t = sum_e g_{t,e} f_e(x)``.
- **PLE** (Tang et al., 2020): ``L`` CGC levels of ``E_s`` shared experts and ``E_p`` private
  experts per task. At each level task ``t`` mixes its own and the shared experts (run on its
  own input ``x_t``, the shared ones on the shared input ``x_s``) with
  ``softmax(x_t W_t)``; below the last level a shared gate ``softmax(x_s W_s)`` over all
  experts gives the next shared input. Level 1 starts from ``x_t = x_s = x``.
- **SMES** (MODELS.md 6): progressive sparse routing (:func:`smes_route`); each selected
  expert runs once per example through :func:`recjax.kernels.moe.expert_slots` and every
  task that selected it reuses the result.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.kernels import moe as moe_kernels
from recjax.layers.token_mixing import fan_in_init, stacked_param, xavier_init
from recjax.parallel.sharding import constrain


class TaskTowers(nnx.Module):
    """``[T, B, D] -> [T, B]``: an MLP per task (ReLU between layers), weights stacked ``[T, ...]``."""

    def __init__(self, tasks: int, widths: list[int], *, rngs: nnx.Rngs):
        self.tasks = tasks
        self.kernels = nnx.List([stacked_param(rngs, (tasks, a, b), (None, None, None), xavier_init())
                                 for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.biases = nnx.List([nnx.Param(jnp.zeros((tasks, 1, b), jnp.float32)) for b in widths[1:]])

    def __call__(self, h: jax.Array) -> jax.Array:
        for i, (w, b) in enumerate(zip(self.kernels, self.biases, strict=True)):
            h = jnp.einsum("tbi,tio->tbo", h, w[...].astype(h.dtype)) + b[...].astype(h.dtype)
            if i + 1 < len(self.kernels):
                h = jax.nn.relu(h)
        return h[..., 0]


def task_logits(out: jax.Array, tasks: int) -> jax.Array:
    """A head's output ``[B, max(T, 1)]`` -> fp32 logits, batch-sharded: ``[B]`` for single-label
    data (``tasks == 0``), else ``[B, T]``."""
    out = (out if tasks else out[:, 0]).astype(jnp.float32)
    return constrain(out, ("batch",) + ((None,) if tasks else ()))


def expert_params(rngs: nnx.Rngs, lead: tuple[int, ...], d: int, f: int) -> tuple[nnx.Param, nnx.Param]:
    """``w_gate_up [*lead, D, 2, F]`` and ``w_down [*lead, F, D]`` (``lead`` ends in the expert axis)."""
    axes = (None,) * (len(lead) - 1) + ("experts",)
    gate_up = stacked_param(rngs, (*lead, d, 2, f), (*axes, "embed", None, "mlp"), xavier_init(fan_in_axis=-3))
    down = stacked_param(rngs, (*lead, f, d), (*axes, "mlp", "embed"), xavier_init())
    return gate_up, down


def all_experts(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Every expert on every row: ``x [..., N, D]`` with weights ``[..., E, D, 2, F]`` and
    ``[..., E, F, D]`` (matching leading dims) -> fp32 ``[..., N, E, D]``."""
    w_gate_up, w_down = w_gate_up.astype(x.dtype), w_down.astype(x.dtype)
    h = jnp.einsum("...nd,...edcf->...necf", x, w_gate_up, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(h[..., 0, :]) * h[..., 1, :]).astype(x.dtype)
    return jnp.einsum("...nef,...efd->...ned", a, w_down, preferred_element_type=jnp.float32)


def gate(x: jax.Array, w: jax.Array) -> jax.Array:
    """``softmax(x w)`` in fp32: ``x [..., N, D]``, ``w [..., D, E]`` -> ``[..., N, E]``."""
    return jax.nn.softmax(jnp.einsum("...nd,...de->...ne", x.astype(jnp.float32), w.astype(jnp.float32)), axis=-1)


class MMoE(nnx.Module):
    """``x [N, D] -> ([T, N, D], stats)``: ``E`` shared experts, one softmax gate per task."""

    def __init__(self, d: int, f: int, experts: int, tasks: int, *, rngs: nnx.Rngs):
        self.gates = stacked_param(rngs, (tasks, d, experts), (None, "embed", None), fan_in_init())
        self.w_gate_up, self.w_down = expert_params(rngs, (experts,), d, f)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        y = all_experts(x, self.w_gate_up[...], self.w_down[...])  # [N, E, D]
        g = gate(x, self.gates[...])  # [T, N, E]
        out = jnp.einsum("tne,ned->tnd", g, y).astype(x.dtype)
        return out, {"expert_load": jax.lax.stop_gradient(g.mean(axis=(0, 1)))}


class PLE(nnx.Module):
    """``x [N, D] -> ([T, N, D], stats)``: ``levels`` CGC levels (see the module docstring)."""

    def __init__(self, d: int, f: int, shared: int, private: int, tasks: int, levels: int, *, rngs: nnx.Rngs):
        self.levels, self.tasks = levels, tasks
        init = fan_in_init()
        self.task_gates = stacked_param(rngs, (levels, tasks, d, private + shared), (None, None, "embed", None), init)
        # the last level has no shared gate: nothing reads its shared output
        self.shared_gates = stacked_param(rngs, (levels - 1, d, tasks * private + shared), (None, "embed", None),
                                          init) if levels > 1 else None
        self.private_gate_up, self.private_down = expert_params(rngs, (levels, tasks, private), d, f)
        self.shared_gate_up, self.shared_down = expert_params(rngs, (levels, shared), d, f)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x_task = jnp.broadcast_to(x, (self.tasks, *x.shape))  # [T, N, D]
        x_shared = x
        for level in range(self.levels):
            own = all_experts(x_task, self.private_gate_up[level], self.private_down[level])  # [T, N, Ep, D]
            common = all_experts(x_shared, self.shared_gate_up[level], self.shared_down[level])  # [N, Es, D]
            both = jnp.concatenate([own, jnp.broadcast_to(common, (self.tasks, *common.shape))], axis=2)
            g = gate(x_task, self.task_gates[level])  # [T, N, Ep + Es]
            next_task = jnp.einsum("tne,tned->tnd", g, both).astype(x.dtype)
            if level + 1 < self.levels:
                every = jnp.concatenate([own.transpose(1, 0, 2, 3).reshape(x.shape[0], -1, x.shape[1]), common], 1)
                x_shared = jnp.einsum("ne,ned->nd", gate(x_shared, self.shared_gates[level]), every).astype(x.dtype)
            x_task = next_task
        return x_task, {}


class SMESRouting(NamedTuple):
    """Output of :func:`smes_route` for router logits ``[T, N, E]``, ``K = K_s + T K_a`` slots.

    expert_ids:  ``[N, K]`` int32: the shared set, then each task's private set; a private
                 expert already in an earlier slot of the example is ``E`` (empty: not run).
    gates:       ``[T, N, K]`` fp32: task ``t``'s weight of each slot (0 off ``K_t`` and on
                 empty slots); differentiable to task ``t``'s logits only.
    group_sizes: ``[E]`` int32 examples that run each expert (the grouped-matmul rows).
    stats:       ``expert_evals`` (mean experts run per example), ``expert_load [E]``
                 (``group_sizes / sum``), ``balance_loss`` (differentiable).
    """

    expert_ids: jax.Array
    gates: jax.Array
    group_sizes: jax.Array
    stats: dict[str, jax.Array]


def smes_route(logits: jax.Array, task_weight: jax.Array, k_shared: int, k_private: int) -> SMESRouting:
    """SMES progressive routing of ``logits z [T, N, E]`` (fp32), with ``p_t = softmax(z_t)``::

        s_e   = sum_t w_t p_{t,e}                      S = TopK(s, K_s)       (shared stage)
        A_t   = TopK_{e not in S}(z_{t,e}, K_a)        K_t = S u A_t          (private stage)
        g_t,e = p_{t,e} / sum_{e' in K_t} p_{t,e'}     for e in K_t, else 0   (renormalised)
        L_lb  = (E / K) sum_e fbar_e pbar_e,   K = K_s + K_a,
        fbar_e = mean_{t,n} 1[e in K_{t,n}] (no gradient),   pbar_e = mean_{t,n} p_{t,n,e}

    ``L_lb`` pools selection frequency and probability mass over every task's gate (the
    global multi-gate balance); it is 1 when both are uniform. The selections are discrete,
    so task ``t``'s outputs depend on ``z_t`` alone through ``g_t``. Each example runs
    ``|S u A_1 u ... u A_T| <= K_s + T K_a`` experts.
    """
    t, n, e = logits.shape
    if min(k_shared, k_private) < 0 or not 1 <= k_shared + k_private <= e:
        raise ValueError(f"smes_route: need K_s, K_a >= 0 and 1 <= K_s + K_a <= E={e}, got K_s={k_shared}, "
                         f"K_a={k_private}")
    logits = logits.astype(jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)  # [T, N, E]
    score = jnp.einsum("t,tne->ne", task_weight.astype(jnp.float32), jax.lax.stop_gradient(p))
    _, shared = moe_kernels.top_k(score, k_shared)  # [N, Ks]
    in_shared = jax.nn.one_hot(shared, e, dtype=jnp.bool_).any(axis=-2)  # [N, E]
    masked = jnp.where(in_shared, -jnp.inf, jax.lax.stop_gradient(logits))
    _, private = moe_kernels.top_k(masked, k_private)  # [T, N, Ka]
    selected = in_shared | jax.nn.one_hot(private, e, dtype=jnp.bool_).any(axis=-2)  # [T, N, E]
    g = jnp.where(selected, p, 0.0)
    g = g / jnp.sum(g, axis=-1, keepdims=True)
    ids = jnp.concatenate([shared, private.transpose(1, 0, 2).reshape(n, t * k_private)], axis=1)  # [N, K]
    k = ids.shape[1]
    earlier = jnp.tril(jnp.ones((k, k), jnp.bool_), -1)  # [j, j']: j' < j
    repeat = jnp.any((ids[:, :, None] == ids[:, None, :]) & earlier, axis=-1)  # [N, K]
    ids = jnp.where(repeat, e, ids).astype(jnp.int32)
    gates = jnp.where(repeat, 0.0, jnp.take_along_axis(g, jnp.minimum(ids, e - 1)[None], axis=-1))  # [T, N, K]
    group_sizes = jax.nn.one_hot(ids, e, dtype=jnp.int32).sum(axis=(0, 1))  # id E: all-zero row
    fbar = jax.lax.stop_gradient(selected.astype(jnp.float32).mean(axis=(0, 1)))
    balance = (e / (k_shared + k_private)) * jnp.sum(fbar * p.mean(axis=(0, 1)))
    load = group_sizes.astype(jnp.float32) / jnp.maximum(group_sizes.sum(), 1)
    stats = {"expert_evals": jnp.sum(group_sizes) / n, "expert_load": load, "balance_loss": balance}
    return SMESRouting(ids, gates, group_sizes, stats)


class SMES(nnx.Module):
    """``x [N, D] -> ([T, N, D], stats)``: :func:`smes_route` over ``E`` experts, each
    selected expert once per example (:func:`recjax.kernels.moe.expert_slots`)."""

    def __init__(self, d: int, f: int, experts: int, tasks: int, k_shared: int, k_private: int,
                 task_weight: list[float], impl: str, *, rngs: nnx.Rngs):
        self.k_shared, self.k_private, self.impl = k_shared, k_private, impl
        self.task_weight = tuple(float(w) for w in task_weight)
        self.routers = stacked_param(rngs, (tasks, d, experts), (None, "embed", None), fan_in_init())
        self.w_gate_up, self.w_down = expert_params(rngs, (experts,), d, f)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        z = jnp.einsum("nd,tde->tne", x.astype(jnp.float32), self.routers[...].astype(jnp.float32))
        r = smes_route(z, jnp.asarray(self.task_weight), self.k_shared, self.k_private)
        w_gu, w_down = (w[...].astype(x.dtype)[None] for w in (self.w_gate_up, self.w_down))
        slots = moe_kernels.expert_slots(x[None], r.expert_ids[None], r.group_sizes[None], w_gu, w_down,
                                         resolve_slots_impl(self.impl))[0]  # [N, K, D]
        out = jnp.einsum("tnk,nkd->tnd", r.gates, slots).astype(x.dtype)
        return out, dict(r.stats)


def resolve_slots_impl(impl: str) -> str:
    """``auto``: the Triton grouped GEMM on GPU, XLA's ragged dot elsewhere."""
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl not in ("pallas", "interpret", "xla", "tokamax", "reference"):
        raise ValueError(f"smes impl must be auto, pallas, interpret, xla, tokamax or reference, got {impl!r}")
    return impl
