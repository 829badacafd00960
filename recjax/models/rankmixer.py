"""RankMixer (arXiv 2507.15551): parameter-free TokenMix + per-token FFN, post-LayerNorm.

Shapes: ``B`` batch, ``T`` tokens, ``D`` token width, ``L`` layers, ``E`` experts.

- **Tokens.** ``x0 = [dense, e_1..e_F]`` ``[B, W]`` is split into ``T`` contiguous
  segments, each projected by its own linear map to ``D`` (:mod:`recjax.layers.tokenizer`).
- **Block** (post-norm)::

      S  = LN(TokenMix(X) + X)          TokenMix = mix with H = T heads (no parameters)
      X' = LN(PFFN(S) + S)              PFFN_t(s) = W2_t GELU(W1_t s + b1_t) + b2_t

  ``W1_t [D, kD]``, ``W2_t [kD, D]`` are per token (batched einsum over the token axis).
- **Head.** Mean over tokens, then an MLP tower to one logit.
- **Sparse MoE variant** (``experts = E > 0``): each token's PFFN is split into ``E``
  experts of width ``kD/E`` with a ReLU router ``G = ReLU(x_t R_t)`` ``[E]``:
  ``v_t = sum_j G_j expert_{t,j}(s_t)`` and an L1 penalty ``router_l1_weight * mean(sum_j
  G_j)`` on the router used at inference. *Dense-train, sparse-infer* (``dtsi``): two
  routers are trained together; the training forward uses the mean of both routers' gates
  (by linearity, the mean of their two outputs), the penalty applies to the inference
  router only, and evaluation (``train=False``) uses the inference router alone, whose
  zero gates skip their experts. The paper's exact combination of the two routers in
  training and its budget controller are unconfirmed; the L1 weight here is fixed and the
  active-expert ratio is logged (``router_active_ratio``). Experts are computed densely
  (training cost does not depend on the gates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ModelConfig
from recjax.data.spec import FeatureSpec
from recjax.errors import ConfigError
from recjax.layers.embedding import EmbeddingCollection, resolve_tables
from recjax.layers.mlp import MLP, mlp_flops
from recjax.layers.token_mixing import fan_in_init, layer_norm, mix, per_token_dense, stacked_param
from recjax.layers.tokenizer import FeatureTokenizer, split_segments, tokenizer_flops
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class RankMixerConfig(ModelConfig):
    name: str = "rankmixer"
    num_tokens: int = 8  # T (= TokenMix heads); dim % num_tokens == 0
    dim: int = 64  # D
    num_layers: int = 2  # L
    ffn_mult: float = 4.0  # k: PFFN hidden width = k * D
    head_hidden: list[int] = field(default_factory=lambda: [256])
    experts: int = 0  # E > 0: sparse MoE PFFN with ReLU routing
    router_l1_weight: float = 1e-3
    dtsi: bool = True  # dense-train / sparse-infer routers


def _check(m: RankMixerConfig) -> int:
    if m.num_tokens <= 0 or m.dim <= 0 or m.num_layers <= 0:
        raise ConfigError("model: num_tokens, dim and num_layers must be positive")
    if m.dim % m.num_tokens:
        raise ConfigError(
            f"model.dim={m.dim} must be divisible by model.num_tokens={m.num_tokens} "
            "(TokenMix uses H = T heads of width D/T)"
        )
    hidden = round(m.ffn_mult * m.dim)
    if m.experts < 0 or (m.experts and hidden % m.experts):
        raise ConfigError(f"model.experts={m.experts} must be >= 0 and divide the PFFN width {hidden}")
    return hidden


def _segments(cfg: Config, features: FeatureSpec):
    tables = resolve_tables(features, cfg.embedding)
    width = features.num_dense + sum(t.dim * len(t.features) for t in tables)
    return split_segments(width, cfg.model.num_tokens)  # type: ignore[attr-defined]


class RankMixer(nnx.Module):
    """``model(batch, train) -> (logits fp32 [B], aux)``."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        m: RankMixerConfig = cfg.model  # type: ignore[assignment]
        hidden = _check(m)
        L, T, D, E = m.num_layers, m.num_tokens, m.dim, m.experts
        self.dtype, self.tokens, self.experts = dtype, T, E
        self.dtsi, self.l1 = m.dtsi, m.router_l1_weight
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        self.tokenizer = FeatureTokenizer(
            _segments(cfg, features), D, input_width=0, dtype=dtype, rngs=rngs
        )
        ones, zeros = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
        p = {
            "ln1_scale": stacked_param(rngs, (L, D), ("layers", None), ones),
            "ln1_bias": stacked_param(rngs, (L, D), ("layers", None), zeros),
            "ln2_scale": stacked_param(rngs, (L, D), ("layers", None), ones),
            "ln2_bias": stacked_param(rngs, (L, D), ("layers", None), zeros),
        }
        if not E:
            p["w1"] = stacked_param(rngs, (L, T, D, hidden), ("layers", "tokens", "embed", "mlp"), fan_in_init())
            p["b1"] = stacked_param(rngs, (L, T, hidden), ("layers", "tokens", "mlp"), zeros)
            p["w2"] = stacked_param(rngs, (L, T, hidden, D), ("layers", "tokens", "mlp", "embed"), fan_in_init())
            p["b2"] = stacked_param(rngs, (L, T, D), ("layers", "tokens", None), zeros)
        else:
            f = hidden // E
            ax = ("layers", "tokens", "experts")
            p["w1"] = stacked_param(rngs, (L, T, E, D, f), (*ax, "embed", "mlp"), fan_in_init())
            p["b1"] = stacked_param(rngs, (L, T, E, f), (*ax, "mlp"), zeros)
            p["w2"] = stacked_param(rngs, (L, T, E, f, D), (*ax, "mlp", "embed"), fan_in_init())
            p["b2"] = stacked_param(rngs, (L, T, E, D), (*ax, None), zeros)
            for name in ("router_infer", "router_train") if m.dtsi else ("router_infer",):
                p[name] = stacked_param(rngs, (L, T, D, E), ("layers", "tokens", "embed", None), fan_in_init())
        self.layers = nnx.Dict(p)
        self.head = MLP(D, [*m.head_hidden, 1], activation="relu", dtype=dtype, rngs=rngs)

    def _pffn(self, p: dict[str, jax.Array], s: jax.Array) -> jax.Array:
        h = jax.nn.gelu(per_token_dense(s, p["w1"]) + p["b1"].astype(s.dtype))
        return per_token_dense(h, p["w2"]) + p["b2"].astype(s.dtype)

    def _sparse_pffn(self, p: dict[str, jax.Array], s: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        c = lambda a: a.astype(s.dtype)
        gates_inf = jax.nn.relu(jnp.einsum("btd,tde->bte", s, c(p["router_infer"])))  # [B, T, E]
        gates = gates_inf
        if train and self.dtsi:
            gates = 0.5 * (gates + jax.nn.relu(jnp.einsum("btd,tde->bte", s, c(p["router_train"]))))
        h = jax.nn.gelu(jnp.einsum("btd,tedf->btef", s, c(p["w1"])) + c(p["b1"]))  # [B, T, E, f]
        y = jnp.einsum("btef,tefd->btd", h * gates[..., None], c(p["w2"]))
        y = y + jnp.einsum("bte,ted->btd", gates, c(p["b2"]))
        g32 = gates_inf.astype(jnp.float32)
        stats = {"l1": g32.sum(-1).mean(), "active": (g32 > 0).mean()}
        return y, stats

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, Any]]:
        vecs, stats = self.embedding.lookup(batch["sparse"])
        dense_in = constrain(batch["dense"], ("batch", None)).astype(self.dtype)
        x0 = constrain(jnp.concatenate([dense_in, *vecs], axis=1), ("batch", None))
        x = constrain(self.tokenizer(x0), ("batch", "tokens", None))
        params = {k: v[...] for k, v in self.layers.items()}
        l1, active = [], []
        for layer in range(params["w1"].shape[0]):
            p = {k: v[layer] for k, v in params.items()}
            s = layer_norm(mix(x, self.tokens) + x, p["ln1_scale"], p["ln1_bias"])
            if self.experts:
                f, st = self._sparse_pffn(p, s, train)
                l1.append(st["l1"])
                active.append(st["active"])
            else:
                f = self._pffn(p, s)
            x = constrain(layer_norm(f + s, p["ln2_scale"], p["ln2_bias"]), ("batch", "tokens", None))
        pooled = x.astype(jnp.float32).mean(axis=1).astype(self.dtype)
        logits = self.head(pooled)[:, 0].astype(jnp.float32)
        aux: dict[str, Any] = dict(stats)
        if self.experts:
            aux["router_l1"] = jnp.mean(jnp.stack(l1))
            aux["router_active_ratio"] = jnp.mean(jnp.stack(active))
            aux["aux_loss"] = self.l1 * aux["router_l1"]
        return constrain(logits, ("batch",)), aux


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> RankMixer:
    return RankMixer(cfg, features, dtype, rngs)


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """Tokenizer + per layer ``T (4 D kD [+ 2 D E per router])`` + head (training: all experts)."""
    m: RankMixerConfig = cfg.model  # type: ignore[assignment]
    hidden = _check(m)
    per_layer = m.num_tokens * 4.0 * m.dim * hidden
    if m.experts:
        routers = 2 if m.dtsi else 1
        per_layer += m.num_tokens * 2.0 * m.dim * m.experts * routers + m.num_tokens * 2.0 * m.experts * m.dim
    flops = m.num_layers * per_layer
    flops += tokenizer_flops(_segments(cfg, features), m.dim, [], None)
    return flops + mlp_flops(m.dim, [*m.head_hidden, 1])


register("rankmixer", RankMixerConfig, build, forward_flops)
