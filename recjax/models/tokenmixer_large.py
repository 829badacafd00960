"""TokenMixer-Large (arXiv 2602.06563): mixing-and-reverting blocks with per-token SwiGLU.

Shapes: ``B`` batch, ``T`` tokens (including the global token), ``D`` token width, ``H``
mix heads, ``L`` layers, ``E`` experts.

- **Tokens.** ``x0 = [dense, e_1..e_F]``; ``T-1`` semantic groups, ``X_g = MLP_g(x0[group
  g])``, and a global token ``X_G = MLP_global(x0)`` first: ``X [B, T, D]``
  (:mod:`recjax.layers.tokenizer`).
- **Block** (pre-RMSNorm, no biases; ``X`` is the block input; ``block_layout: paper``, the
  default, as MODELS.md section 2 draws it)::

      X'    = X  + revert(pSwiGLU_mixed(mix(RMSNorm(X))))      H weight banks of width T*D/H
      Xout  = X' + pSwiGLU_token(RMSNorm(X'))                  T weight banks of width D

  Both residuals live in the token layout, so the mixed sub-block's output stays in the
  residual stream. ``block_layout: mixed_residual`` is the block recjax had before (kept for
  the ablation): norm and residual in the mixed layout, ``H' = mix(X) +
  pSwiGLU_mixed(RMSNorm(mix(X)))``, and the second residual against the block input, ``Xout =
  X + pSwiGLU_token(RMSNorm(revert(H')))``, which drops the mixed branch from the residual
  stream. ``pSwiGLU_t(x) = W_down_t (silu(W_gate_t x) * W_up_t x)`` with hidden width ``n*D``
  is a batched einsum over the token axis.
- **Initialisation.** Every SwiGLU (mixed, per-token, experts, shared expert) draws
  ``W_gate``, ``W_up`` from Xavier-uniform and ``W_down`` from Xavier-uniform times
  ``down_init_scale`` (0.01: the paper's [1, 1, 0.01] scales, +0.03% AUC; a scale of the
  Xavier init, not a std).
- **Inter-layer residuals.** After layer ``l`` (1-based) with ``l % k == 0`` and ``l < L``
  the output of layer ``l - k`` is added (``model.residual_every = k``; 0 disables).
- **Auxiliary loss.** A light head (RMSNorm, mean over tokens, one linear unit) on the
  output of layer ``aux_layer`` is trained with the same BCE, weighted by
  ``aux_loss_weight`` and added to the loss; serving uses the top head only. (How the
  paper combines the lower-layer logits is unconfirmed; this is the simplest faithful
  choice.)
- **Head.** RMSNorm, mean over tokens, MLP ``head_hidden`` -> 1 logit.
- **Sparse-Pertoken MoE** (``moe_experts = E > 0``) replaces ``pSwiGLU_token``: token
  position ``t`` has its own router ``[D, E]`` and ``E`` SwiGLU experts of width ``n*D/E``::

      SP-MoE(x_t) = alpha * sum_{j in top-k'} g_j(x_t) Expert_{t,j}(x_t) + Shared_t(x_t)

  ``moe_top_k = k`` counts the experts an example's token uses: with the shared per-token
  expert (width ``n*D/E``, ``moe_shared_expert``) the routed set is top-``(k-1)``, else
  top-``k``; ``k'`` is that routed count. ``g`` = softmax over the selected router scores,
  ``alpha`` = the routed inverse sparsity ``E/k'`` unless set, an optional switch
  load-balancing loss. With a single routed expert its gate is softmax of one score, 1, and
  the router learns nothing from the task loss (only from the balancing loss): keep ``k' >= 2``.
  Dropless; computed by :func:`recjax.kernels.moe.moe_ffn` (the only MoE code path).
- **Optimizer.** The paper trains dense and sparse parameters with Adagrad (dense lr 0.01,
  sparse 0.05): ``optim.dense={name: adagrad, lr: 0.01}`` with ``optim.embedding={name:
  rowwise_adagrad, lr: 0.05}``; recjax's presets default to Adam for the dense part.

Ablation switches (one key each): ``mix_revert: false`` (the first sublayer runs on the
token layout, ``T`` banks of width ``D``), ``per_token: false`` (one SwiGLU shared by all
tokens in both sublayers), ``residuals: false`` (no residual inside the block),
``block_layout: mixed_residual`` (the earlier block, above), ``down_init_scale: 1`` (full
Xavier down-projections), ``residual_every: 0`` (no inter-layer residual),
``aux_loss_weight: 0`` (no auxiliary loss), ``global_token: false`` (``T`` group tokens, no
global token), ``moe_per_token: false`` (one standard MoE shared by all token positions).

Layers are stacked (every parameter has a leading ``L`` axis) and run under
``jax.lax.scan`` (``scan_layers``), optionally rematerialised per layer (``remat``).
Logical axes: ``tokens`` (token / head-bank axis: token parallelism), ``embed`` (width
``D``: FSDP), ``mlp`` (hidden width: tensor parallelism), ``experts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ModelConfig
from recjax.data.spec import FeatureSpec
from recjax.errors import ConfigError
from recjax.kernels import moe as moe_kernels
from recjax.kernels import moe_parallel
from recjax.layers.embedding import EmbeddingCollection, resolve_tables
from recjax.layers.mlp import MLP, dense, mlp_flops
from recjax.layers.multitask import task_logits
from recjax.layers.token_mixing import (
    fan_in_init,
    mix,
    revert,
    rms_norm,
    stacked_param,
    swiglu,
    xavier_init,
)
from recjax.layers.tokenizer import FeatureTokenizer, semantic_groups, tokenizer_flops
from recjax.models.registry import register
from recjax.parallel import sharding as shd
from recjax.parallel.sharding import constrain


@dataclass
class TokenMixerLargeConfig(ModelConfig):
    name: str = "tokenmixer_large"
    num_tokens: int = 8  # T, including the global token
    dim: int = 64  # D
    num_layers: int = 2  # L
    num_heads: int = 8  # H: mix heads; D % H == 0
    mixed_ffn_mult: float = 2.0  # hidden of a mixed bank = mult * T*D/H
    token_ffn_mult: float = 2.0  # n: hidden of a per-token SwiGLU = n * D
    tokenizer_hidden: list[int] = field(default_factory=list)  # hidden widths of each group MLP
    groups: list[list[str]] = field(default_factory=list)  # features per group; [] = automatic
    head_hidden: list[int] = field(default_factory=lambda: [256])
    residual_every: int = 2  # inter-layer residual span k; 0 = off
    aux_layer: int = 0  # aux head on this layer's output (1..L-1); 0 = L // 2
    aux_loss_weight: float = 0.1  # 0 = no auxiliary loss
    # ablations
    block_layout: Literal["paper", "mixed_residual"] = "paper"
    down_init_scale: float = 0.01  # SwiGLU W_down = this x Xavier-uniform
    mix_revert: bool = True
    per_token: bool = True
    residuals: bool = True
    global_token: bool = True
    # Sparse-Pertoken MoE in place of the per-token SwiGLU (0 experts = dense)
    moe_experts: int = 0
    moe_top_k: int = 3  # experts used per token, the shared one included
    moe_shared_expert: bool = True
    moe_per_token: bool = True  # false: one standard MoE shared by all token positions
    moe_alpha: float = 0.0  # output scale; 0 = routed inverse sparsity E / (routed experts)
    moe_load_balance_weight: float = 0.0
    moe_impl: str = "auto"
    # under a multi-device mesh: shard_map (sets, tokens and experts split over the mesh axes of
    # the tokens, batch and experts rules; expert parallelism by all-to-all) or gspmd (moe_ffn
    # left to XLA's partitioner: the sorted paths gather tokens)
    moe_partition: Literal["shard_map", "gspmd"] = "shard_map"
    moe_capacity_factor: float = 0.0  # expert-parallel all-to-all slots per destination; 0 = dropless
    # execution
    scan_layers: bool = True
    remat: Literal["none", "full"] = "none"


@dataclass(frozen=True)
class Shapes:
    """Static shapes and switches of one block (hashable: closed over by the layer scan)."""

    tokens: int
    dim: int
    layers: int
    banks: int  # mixed sublayer: H with mix/revert, else T
    bank_width: int  # T*D/H with mix/revert, else D
    mixed_hidden: int
    token_hidden: int
    experts: int
    top_k: int  # routed experts per token: moe_top_k - 1 with the shared expert
    expert_hidden: int
    alpha: float
    block_layout: str
    down_init_scale: float
    mix_revert: bool
    per_token: bool
    residuals: bool
    moe_per_token: bool
    shared_expert: bool
    moe_impl: str
    moe_partition: str
    moe_capacity_factor: float


def _input_items(cfg: Config, features: FeatureSpec) -> list[tuple[str, int]]:
    tables = resolve_tables(features, cfg.embedding)
    dim_of = {f: t.dim for t in tables for f in t.features}
    items = [("dense", features.num_dense)] if features.num_dense else []
    return items + [(f.name, dim_of[f.name]) for f in features.sparse]


def shapes_of(cfg: Config) -> Shapes:
    m: TokenMixerLargeConfig = cfg.model  # type: ignore[assignment]
    t, d, h = m.num_tokens, m.dim, m.num_heads
    if t < 2 or d <= 0 or m.num_layers <= 0:
        raise ConfigError(f"model: need num_tokens >= 2, dim > 0, num_layers > 0 (got {t}, {d}, {m.num_layers})")
    if m.mix_revert and d % h:
        raise ConfigError(f"model.dim={d} must be divisible by model.num_heads={h}")
    banks, width = (h, t * d // h) if m.mix_revert else (t, d)
    token_hidden = round(m.token_ffn_mult * d)
    e = m.moe_experts
    routed = m.moe_top_k - int(m.moe_shared_expert)
    if e < 0 or (e and not 1 <= routed <= e):
        shared = " + 1 (the shared expert counts as one)" if m.moe_shared_expert else ""
        raise ConfigError(f"model: need moe_experts >= 0 and 1{shared} <= moe_top_k <= moe_experts{shared} "
                          f"(got moe_experts={e}, moe_top_k={m.moe_top_k})")
    if m.block_layout not in ("paper", "mixed_residual"):
        raise ConfigError(f"model.block_layout must be 'paper' or 'mixed_residual', got {m.block_layout!r}")
    if e and token_hidden % e:
        raise ConfigError(f"model: per-token hidden width {token_hidden} (token_ffn_mult * dim) must divide into {e} experts")
    if m.moe_partition not in ("shard_map", "gspmd"):
        raise ConfigError(f"model.moe_partition must be 'shard_map' or 'gspmd', got {m.moe_partition!r}")
    if m.residual_every < 0:
        raise ConfigError(f"model.residual_every must be >= 0, got {m.residual_every}")
    return Shapes(
        tokens=t, dim=d, layers=m.num_layers, banks=banks, bank_width=width,
        mixed_hidden=round(m.mixed_ffn_mult * width), token_hidden=token_hidden,
        experts=e, top_k=routed if e else 0, expert_hidden=token_hidden // e if e else 0,
        alpha=(m.moe_alpha or (e / routed)) if e else 1.0,
        block_layout=m.block_layout, down_init_scale=m.down_init_scale,
        mix_revert=m.mix_revert, per_token=m.per_token, residuals=m.residuals,
        moe_per_token=m.moe_per_token, shared_expert=m.moe_shared_expert, moe_impl=m.moe_impl,
        moe_partition=m.moe_partition, moe_capacity_factor=m.moe_capacity_factor,
    )


def aux_layer_of(m: TokenMixerLargeConfig) -> int:
    layer = m.aux_layer or m.num_layers // 2
    if m.aux_loss_weight > 0 and not 1 <= layer < m.num_layers:
        raise ConfigError(
            f"model.aux_layer={m.aux_layer} must name a lower layer in 1..{m.num_layers - 1} "
            "(or set model.aux_loss_weight=0)"
        )
    return layer


def _groups(cfg: Config, features: FeatureSpec):
    m: TokenMixerLargeConfig = cfg.model  # type: ignore[assignment]
    n_groups = m.num_tokens - 1 if m.global_token else m.num_tokens
    items = _input_items(cfg, features)
    return semantic_groups(items, n_groups, m.groups), sum(w for _, w in items)


def layer_params(s: Shapes, rngs: nnx.Rngs) -> dict[str, nnx.Param]:
    """Stacked ``[L, ...]`` parameters of every block."""
    L, T, D = s.layers, s.tokens, s.dim
    ones = nnx.initializers.ones_init()

    def bank(n_banks: int, shape: tuple[int, ...], axes: tuple[str | None, ...], init) -> nnx.Param:
        if s.per_token:  # own weights per token / head bank
            return stacked_param(rngs, (L, n_banks, *shape), ("layers", "tokens", *axes), init)
        return stacked_param(rngs, (L, *shape), ("layers", *axes), init)

    up, down = xavier_init(), xavier_init(s.down_init_scale)
    norm_shape = (s.banks, s.bank_width) if s.block_layout == "mixed_residual" else (T, D)
    p = {
        "mix_norm": stacked_param(rngs, (L, *norm_shape), ("layers", "tokens", None), ones),
        "mix_gate": bank(s.banks, (s.bank_width, s.mixed_hidden), ("embed", "mlp"), up),
        "mix_up": bank(s.banks, (s.bank_width, s.mixed_hidden), ("embed", "mlp"), up),
        "mix_down": bank(s.banks, (s.mixed_hidden, s.bank_width), ("mlp", "embed"), down),
        "tok_norm": stacked_param(rngs, (L, T, D), ("layers", "tokens", None), ones),
    }
    if not s.experts:
        p["tok_gate"] = bank(T, (D, s.token_hidden), ("embed", "mlp"), up)
        p["tok_up"] = bank(T, (D, s.token_hidden), ("embed", "mlp"), up)
        p["tok_down"] = bank(T, (s.token_hidden, D), ("mlp", "embed"), down)
        return p
    E, F = s.experts, s.expert_hidden
    lead, lead_axes = ((L, T), ("layers", "tokens")) if s.moe_per_token else ((L,), ("layers",))
    p["router"] = stacked_param(rngs, (*lead, D, E), (*lead_axes, "embed", None), fan_in_init())
    # W_gate and W_up of every expert in one array [.., E, D, 2, F] (moe_ffn's layout)
    p["expert_gate_up"] = stacked_param(rngs, (*lead, E, D, 2, F), (*lead_axes, "experts", "embed", None, "mlp"),
                                        xavier_init(fan_in_axis=-3))
    p["expert_down"] = stacked_param(rngs, (*lead, E, F, D), (*lead_axes, "experts", "mlp", "embed"), down)
    if s.shared_expert:
        p["shared_gate"] = bank(T, (D, F), ("embed", "mlp"), up)
        p["shared_up"] = bank(T, (D, F), ("embed", "mlp"), up)
        p["shared_down"] = bank(T, (F, D), ("mlp", "embed"), down)
    return p


def block(s: Shapes, p: dict[str, jax.Array], x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One mixing-and-reverting block: ``x [B, T, D]`` -> ``([B, T, D], MoE statistics)``."""
    to_mixed = (lambda a: mix(a, s.banks)) if s.mix_revert else (lambda a: a)
    to_tokens = (lambda a: revert(a, s.tokens)) if s.mix_revert else (lambda a: a)
    tokens = lambda a: constrain(a, ("batch", "tokens", None))
    if s.block_layout == "paper":
        f = swiglu(tokens(to_mixed(rms_norm(x, p["mix_norm"]))), p["mix_gate"], p["mix_up"], p["mix_down"])
        x1 = tokens(x + to_tokens(f) if s.residuals else to_tokens(f))
        skip = x1
    else:  # mixed_residual
        hm = tokens(to_mixed(x))
        f = swiglu(rms_norm(hm, p["mix_norm"]), p["mix_gate"], p["mix_up"], p["mix_down"])
        x1 = tokens(to_tokens(hm + f if s.residuals else f))
        skip = x
    xn = rms_norm(x1, p["tok_norm"])
    stats: dict[str, jax.Array] = {}
    if not s.experts:
        g = swiglu(xn, p["tok_gate"], p["tok_up"], p["tok_down"])
    else:
        g, stats = _sp_moe(s, p, xn)
    out = skip + g if s.residuals else g
    return tokens(out), stats


def _sp_moe(s: Shapes, p: dict[str, jax.Array], xn: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, t, d = xn.shape
    if s.moe_per_token:  # expert sets per token position: [T, B, D]
        xs = constrain(xn.transpose(1, 0, 2), ("tokens", "batch", None))
    else:  # one expert set for all B*T tokens
        xs = xn.reshape(b * t, d)
    weights = (xs, p["router"], p["expert_gate_up"], p["expert_down"], s.top_k)
    active = shd.active()
    if s.moe_partition == "shard_map" and active is not None and active[0].size > 1:
        mesh, rules = active
        lead = ("tokens",) if s.moe_per_token else (None,)  # x [T, B, D] or [B*T, D]
        sets, tokens = (shd.spec_axes(a) for a in shd.logical_to_spec((*lead, "batch"), rules, mesh))
        experts = shd.spec_axes(shd.logical_to_spec((*lead, "experts"), rules, mesh)[1])
        y, st = moe_parallel.moe_ffn_sharded(
            *weights, mesh=mesh, set_axes=sets, token_axes=tokens,
            expert_axes=experts, gate="softmax", scale=s.alpha, impl=s.moe_impl,
            capacity_factor=s.moe_capacity_factor,
        )
    else:
        y, st = moe_kernels.moe_ffn(*weights, gate="softmax", scale=s.alpha, impl=s.moe_impl)
    y = y.transpose(1, 0, 2) if s.moe_per_token else y.reshape(b, t, d)
    if s.shared_expert:
        y = y + swiglu(xn, p["shared_gate"], p["shared_up"], p["shared_down"])
    frac = st["expert_fraction"].reshape(-1, s.experts)  # [T or 1, E]
    stats = {
        "expert_fraction": frac.mean(0),
        "load_max_over_mean": (frac.max(-1) / jnp.maximum(frac.mean(-1), 1e-9)).mean(),
        "load_balance_loss": st["load_balance_loss"],
        "dropped": st.get("dropped", jnp.zeros((), jnp.int32)),
    }
    return y, stats


class TokenMixerLarge(nnx.Module):
    """``model(batch, train) -> (logits fp32 [B] ([B, T] on multi-task data), aux)``: ``aux["aux_loss"]`` (MoE balance) joins
    the loss, and so does the task's BCE of ``aux["aux_logits"]`` (the auxiliary head)."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        m: TokenMixerLargeConfig = cfg.model  # type: ignore[assignment]
        self.s = shapes_of(cfg)
        self.aux_layer = aux_layer_of(m)
        self.aux_weight = m.aux_loss_weight
        self.lb_weight = m.moe_load_balance_weight
        self.residual_every = m.residual_every
        self.scan_layers = m.scan_layers
        self.remat = m.remat
        self.dtype = dtype
        groups, width = _groups(cfg, features)
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        self.tokenizer = FeatureTokenizer(
            groups, m.dim, hidden=m.tokenizer_hidden, global_token=m.global_token,
            input_width=width, dtype=dtype, rngs=rngs,
        )
        self.layers = nnx.Dict(layer_params(self.s, rngs))
        ones = nnx.initializers.ones_init()
        self.final_norm = stacked_param(rngs, (m.num_tokens, m.dim), ("tokens", None), ones)
        self.tasks = features.tasks  # multi-task data: one logit per task from the same head
        outputs = max(features.tasks, 1)
        self.head = MLP(m.dim, [*m.head_hidden, outputs], activation="relu", dtype=dtype, rngs=rngs)
        if self.aux_weight > 0:
            self.aux_norm = stacked_param(rngs, (m.num_tokens, m.dim), ("tokens", None), ones)
            self.aux_head = dense(m.dim, outputs, axes=("embed", None), dtype=dtype, rngs=rngs)

    def _layers(self, x: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Run the ``L`` blocks; returns (top output, aux-layer output, per-layer MoE stats)."""
        s, k, aux_at = self.s, self.residual_every, self.aux_layer
        params = {name: v[...] for name, v in self.layers.items()}

        def body(carry, inputs):
            x, anchor, aux_x = carry
            layer, p = inputs
            x, stats = block(s, p, x)
            end = layer + 1
            if k > 0:  # inter-layer residual from k layers back, never on the last layer
                at_span = end % k == 0
                x = x + jnp.where(at_span & (end < s.layers), anchor, jnp.zeros_like(anchor))
                anchor = jnp.where(at_span, x, anchor)
            aux_x = jnp.where(end == aux_at, x, aux_x)
            return (x, anchor, aux_x), stats

        if self.remat == "full":
            body = jax.checkpoint(body, prevent_cse=not self.scan_layers)
        carry = (x, x, jnp.zeros_like(x))
        if self.scan_layers:
            carry, stats = jax.lax.scan(body, carry, (jnp.arange(s.layers), params))
        else:  # unrolled (XLA's cost analysis counts a scan body once)
            per_layer = []
            for layer in range(s.layers):
                carry, st = body(carry, (jnp.asarray(layer), jax.tree.map(lambda a, i=layer: a[i], params)))
                per_layer.append(st)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer[0] else {}
        return carry[0], carry[2], stats

    def _pool(self, x: jax.Array, scale: nnx.Param) -> jax.Array:
        pooled = rms_norm(x, scale[...]).astype(jnp.float32).mean(axis=1).astype(self.dtype)  # [B, D]
        return constrain(pooled, ("batch", None))  # else GSPMD gathers the batch in the heads' backward

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, Any]]:
        vecs, stats = self.embedding.lookup(batch["sparse"])
        dense_in = constrain(batch["dense"], ("batch", None)).astype(self.dtype)
        x0 = constrain(jnp.concatenate([dense_in, *vecs], axis=1), ("batch", None))
        x = constrain(self.tokenizer(x0), ("batch", "tokens", None))
        top, lower, stats = self._layers(x)
        logits = task_logits(self.head(self._pool(top, self.final_norm)), self.tasks)
        aux: dict[str, Any] = dict(stats)
        aux_loss = jnp.zeros((), jnp.float32)
        if self.aux_weight > 0:  # the ctr task scores these with the same BCE, times the weight
            aux["aux_logits"] = task_logits(self.aux_head(self._pool(lower, self.aux_norm)), self.tasks)
            aux["aux_logits_weight"] = jnp.float32(self.aux_weight)
        if stats:
            lb = stats["load_balance_loss"].mean()
            aux["moe_load_balance_loss"] = lb
            aux["moe_load_max_over_mean"] = stats["load_max_over_mean"].mean()
            aux["moe_expert_fraction"] = stats["expert_fraction"].mean(0)  # [E]
            aux["moe_dropped"] = stats["dropped"].sum()  # token copies over the all-to-all capacity
            if self.lb_weight > 0:
                aux_loss = aux_loss + self.lb_weight * lb
        aux["aux_loss"] = aux_loss
        return logits, aux


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> TokenMixerLarge:
    return TokenMixerLarge(cfg, features, dtype, rngs)


def forward_flops(cfg: Config, features: FeatureSpec, active: bool = True) -> float:
    """Matmul FLOPs of one example's forward pass (MoE: active experts only unless ``active=False``).

    Per layer: mixed sublayer ``banks * 3 * 2 * W * F_m``; per-token SwiGLU ``T * 3 * 2 * D *
    n D``; or MoE ``T * (2 D E + k * 6 D F_e [+ 6 D F_e shared])``. Plus the tokenizer, the
    head MLP and the aux head.
    """
    m: TokenMixerLargeConfig = cfg.model  # type: ignore[assignment]
    s = shapes_of(cfg)
    groups, width = _groups(cfg, features)
    per_layer = s.banks * 6.0 * s.bank_width * s.mixed_hidden
    if not s.experts:
        per_layer += s.tokens * 6.0 * s.dim * s.token_hidden
    else:
        used = s.top_k if active else s.experts
        per_layer += s.tokens * (2.0 * s.dim * s.experts + used * 6.0 * s.dim * s.expert_hidden)
        if s.shared_expert:
            per_layer += s.tokens * 6.0 * s.dim * s.expert_hidden
    flops = s.layers * per_layer
    flops += tokenizer_flops(groups, m.dim, m.tokenizer_hidden, width if m.global_token else None)
    outputs = max(features.tasks, 1)
    flops += mlp_flops(m.dim, [*m.head_hidden, outputs])
    if m.aux_loss_weight > 0:
        flops += 2.0 * m.dim * outputs
    return flops


def inactive_params(cfg: Config, features: FeatureSpec) -> int:
    """Parameters an example does not use: the ``E - k`` unselected experts of every MoE."""
    s = shapes_of(cfg)
    if not s.experts:
        return 0
    sets = s.layers * (s.tokens if s.moe_per_token else 1)
    return sets * (s.experts - s.top_k) * 3 * s.dim * s.expert_hidden


def activation_bytes_per_example(cfg: Config, features: FeatureSpec) -> float:
    """Bytes of activations kept for the backward pass per example (analytic memory estimate).

    ``remat: none`` keeps, per layer, the inputs of every matmul and nonlinearity: about
    ``4 T D`` (block input, mixed layout, norms, reverted) plus ``3 banks F_m + 3 T F``
    (gate, up and their product in both SwiGLUs). ``remat: full`` keeps only each layer's
    input ``T D`` plus one layer's working set.
    """
    s = shapes_of(cfg)
    width = 2 if cfg.train.compute_dtype == "bfloat16" else 4
    hidden = s.expert_hidden * (s.top_k + s.shared_expert) if s.experts else s.token_hidden
    per_layer = 4 * s.tokens * s.dim + 3 * s.banks * s.mixed_hidden + 3 * s.tokens * hidden
    if cfg.model.remat == "full":  # type: ignore[attr-defined]
        return width * (s.layers * s.tokens * s.dim + per_layer)
    return width * s.layers * per_layer


register(
    "tokenmixer_large", TokenMixerLargeConfig, build, forward_flops,
    inactive_params=inactive_params, activation_bytes=activation_bytes_per_example, multi_task=True,
)
