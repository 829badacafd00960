"""Sequential recommenders on one backbone: SASRec, BERT4Rec, LinRec, Cotten4Rec.

Shapes: ``B`` batch, ``S`` sequence length (``<= max_len``), ``d = hidden``, ``H = num_heads``,
``d_h = d / H``, ``V = num_items + 2`` item ids (0 = padding, 1..num_items the items,
``num_items + 1`` = [MASK]). Sequences are left-aligned: row ``b`` is valid at ``t < n_b``
(``lengths[b]``) and padding after. The backbone (MODELS.md section 4)::

    x_0[t] = dropout(E[i_t] + P[t])                                  E [V, d], P [max_len, d]
    a_l    = x_{l-1} + dropout(W_o Attn(LN_1(x_{l-1})) + b_o)         l = 1..L, pre-LN
    x_l    = a_l + dropout(W_2 gelu(W_1 LN_2(a_l) + b_1) + b_2)       W_1 [d, inner]
    h[t]   = LN_f(x_L)[t] if t < n_b else 0                           encode() -> [B, S, d]
    logits = h E_out^T + b_out                                        item_logits() -> [..., V]

or, with ``norm: post`` (RecBole's SASRec and BERT4Rec: LayerNorm after each residual sum and
on the embedding sum, no final LayerNorm)::

    x_0 = dropout(LN_e(E[i_t] + P[t]))
    a_l = LN_1(x_{l-1} + dropout(W_o Attn(x_{l-1}) + b_o))
    x_l = LN_2(a_l + dropout(W_2 gelu(W_1 a_l + b_1) + b_2));        h = x_L

``output_head: ffn`` (RecBole's BERT4Rec) maps ``h <- LN_h(gelu(W_h h + b_h))`` before scoring;
``output_bias: false`` (RecBole's SASRec) drops ``b_out``. ``E_out = E``
(``tie_embeddings``) or a separate ``[V, d]`` table. Attention per head
over the valid keys ``s < n_b`` (and ``s <= t`` when ``causal``):

- ``softmax`` (SASRec, BERT4Rec): ``softmax(q k^T / sqrt(d_h)) v``, dropout
  (``attn_dropout``) on the probabilities; padded query rows are 0.
- ``elu_l2`` (LinRec): ``N(elu(q)) (N(elu(k))^T v) / sqrt(d_h)``, N = L2 normalisation
  over ``d_h``, via :func:`recjax.kernels.linear_attention.linear_attention`.
- ``cosine`` (Cotten4Rec): ``q^ (k^T v) / max(n_b^sigmoid(m_h), 1)``, q^ and k^ unit vectors,
  ``m_h`` a learnable per-head scalar (``length_scale``, ``[H]``, init ``length_scale_init``).

The four models are configurations (``configs/models/*.yaml``): SASRec softmax + causal +
next_item; BERT4Rec softmax + bidirectional + cloze; LinRec elu_l2 + causal + next_item;
Cotten4Rec cosine + bidirectional + cloze.

Choices (not fixed by the sources; each is the simplest faithful option):

- Pre-LN blocks with a final LayerNorm by default (MODELS.md); ``configs/models/
  {sasrec,bert4rec}_recbole.yaml`` set RecBole's post-LN, output head and bias. The ML-100k
  SASRec experiment keeps the pre-LN default, which scored higher on windows; the BERT4Rec one
  uses RecBole's preset on prefix rows (the ablation in
  ``notebooks/results/seqrec_ml100k_ablation.md`` measures each difference).
- Dropout sits where RecBole puts it: on the embedding sum and on each residual branch
  (``dropout``), and on the softmax probabilities (``attn_dropout``). Linear attention has no
  probability matrix, so ``attn_dropout`` does not apply to it.
- GELU is the exact (erf) form, as in RecBole. Projections q, k, v, o have biases; all
  weights are ``N(0, init_std)``, biases 0, LayerNorm scale 1.
- The output bias ``b_out [V]`` is on by default (``output_bias``; RecBole's SASRec has none).
- LinRec is causal here (``causal`` is a key): the paper's SASRec-based setting.
- ``max_len`` is the size of the position table; shorter inputs use its first ``S`` rows.

Dropout draws from an explicit key (``rng``), so the module holds parameters only and the
trainer can ``nnx.split`` it once and jit a pure function of the parameters. Pass an
``rbg`` key (``jax.random.key(seed, impl="rbg")``, what the trainer uses): its bit generator
compiles ~5x faster than threefry on CPU and is faster on GPU; its streams are
deterministic per backend but differ between backends.

The item table is an :class:`~recjax.layers.embedding.EmbeddingTable` of
``padded_rows(V, embedding.pad_rows_to)`` rows (so it divides over its row shards), looked
up through :func:`~recjax.layers.embedding.gather_rows` (deduplicated gradient); logits cover
the padded rows too and callers score ids ``1..num_items`` only. The model is built from
``(cfg, SequenceInfo, rngs)``; the ``seqrec`` task (``recjax.tasks.seqrec``) trains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ModelConfig
from recjax.errors import ConfigError
from recjax.kernels.linear_attention import IMPLS, linear_attention
from recjax.kernels.linear_attention_parallel import linear_attention_sharded
from recjax.layers.embedding import EmbeddingTable, gather_rows, padded_rows
from recjax.models.registry import register
from recjax.parallel import sharding as shd


@dataclass(frozen=True)
class SequenceInfo:
    """What the model needs to know of the sequence data: item count and input length."""

    num_items: int  # items are 1..num_items; 0 = padding, num_items + 1 = [MASK]
    max_len: int


@dataclass
class SeqRecConfig(ModelConfig):
    name: str = "seqrec"
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner: int = 256  # FFN width
    dropout: float = 0.5  # embedding sum and residual branches
    attn_dropout: float = 0.5  # softmax probabilities only
    attention: Literal["softmax", "elu_l2", "cosine"] = "softmax"
    causal: bool = True
    objective: Literal["next_item", "cloze"] = "next_item"
    tie_embeddings: bool = True
    norm: Literal["pre", "post"] = "pre"  # pre-LN + final LN, or RecBole's post-LN + embedding LN
    output_head: Literal["none", "ffn"] = "none"  # ffn: BERT4Rec's LN(gelu(W h + b)) before scoring
    output_bias: bool = True  # b_out over the item table (RecBole: BERT4Rec yes, SASRec no)
    loss: Literal["full", "sampled"] = "full"  # next_item: softmax over all items, or sampled
    num_sampled: int = 100  # loss: sampled -- uniform negatives per batch
    sampled_loss: Literal["ce", "bce"] = "ce"  # softmax over target + negatives, or per-item BCE
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    length_scale_init: float = 0.5  # Cotten4Rec's m_h
    attention_impl: str = "auto"  # linear attention: auto | pallas | xla | reference | interpret
    compute_dtype: Literal["", "float32", "bfloat16"] = ""  # "" = train.compute_dtype


def check_config(mcfg: SeqRecConfig) -> None:
    """Raise ``ConfigError`` for values the backbone cannot use."""
    problems = []
    for key in ("hidden", "num_layers", "num_heads", "inner"):
        if getattr(mcfg, key) <= 0:
            problems.append(f"model.{key} must be positive, got {getattr(mcfg, key)}")
    if mcfg.num_heads > 0 and mcfg.hidden % mcfg.num_heads:
        problems.append(
            f"model.hidden={mcfg.hidden} must be divisible by model.num_heads={mcfg.num_heads}"
        )
    for key in ("dropout", "attn_dropout"):
        if not 0.0 <= getattr(mcfg, key) < 1.0:
            problems.append(f"model.{key} must be in [0, 1), got {getattr(mcfg, key)}")
    if mcfg.attention_impl not in IMPLS:
        problems.append(f"model.attention_impl must be one of {IMPLS}, got {mcfg.attention_impl!r}")
    if mcfg.loss == "sampled" and mcfg.objective != "next_item":
        problems.append("model.loss=sampled is implemented for model.objective=next_item only")
    if mcfg.loss == "sampled" and mcfg.num_sampled <= 0:
        problems.append(f"model.num_sampled must be positive, got {mcfg.num_sampled}")
    if problems:
        raise ConfigError("; ".join(problems))


def compute_dtype(cfg: Config) -> jnp.dtype:
    name = cfg.model.compute_dtype or cfg.train.compute_dtype  # type: ignore[attr-defined]
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``rng`` is None (evaluation) or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _key(rng: jax.Array | None, i: int) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, i)


def _linear(din: int, dout: int, axes: tuple[str | None, str | None], std: float,
            dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din, dout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
    )


def _layer_norm(dim: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head attention ``[B, S, d] -> [B, S, d]`` of the configured type."""

    def __init__(self, mcfg: SeqRecConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, std = mcfg.hidden, mcfg.init_std
        self.kind = mcfg.attention
        self.causal = mcfg.causal
        self.heads = mcfg.num_heads
        self.attn_dropout = mcfg.attn_dropout
        self.impl = mcfg.attention_impl
        self.q = _linear(d, d, ("embed", "heads"), std, dtype, rngs)
        self.k = _linear(d, d, ("embed", "heads"), std, dtype, rngs)
        self.v = _linear(d, d, ("embed", "heads"), std, dtype, rngs)
        self.o = _linear(d, d, ("heads", "embed"), std, dtype, rngs)
        if self.kind == "cosine":
            self.length_scale = nnx.Param(
                jnp.full((self.heads,), mcfg.length_scale_init, jnp.float32), out_sharding=("heads",)
            )

    def __call__(self, x: jax.Array, lengths: jax.Array, rng: jax.Array | None) -> jax.Array:
        b, s, d = x.shape
        q, k, v = (f(x).reshape(b, s, self.heads, d // self.heads) for f in (self.q, self.k, self.v))
        if self.kind == "softmax":
            out = self._softmax(q, k, v, lengths, rng)
        else:
            out = self._linear(q, k, v, lengths)
        return self.o(out.reshape(b, s, d))

    def _linear(self, q, k, v, lengths):
        kw = dict(causal=self.causal, lengths=lengths, impl=self.impl, feature_map=self.kind,
                  length_scale=self.length_scale[...] if self.kind == "cosine" else None)
        active = shd.active()
        if active is None or active[0].size == 1:
            return linear_attention(q, k, v, **kw)
        mesh, rules = active  # the kernels are custom calls GSPMD cannot split: shard_map them
        batch, seq, heads = (shd.spec_axes(a) for a in shd.logical_to_spec(("batch", "seq", "heads"), rules, mesh))
        return linear_attention_sharded(q, k, v, mesh=mesh, batch_axes=batch, seq_axes=seq, head_axes=heads, **kw)

    def _softmax(self, q, k, v, lengths, rng):
        s, dh = q.shape[1], q.shape[-1]
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(dh)
        pos = jnp.arange(s)
        valid = pos[None, :] < lengths[:, None]  # [B, S]
        allowed = valid[:, None, None, :]  # keys
        if self.causal:
            allowed = allowed & (pos[None, None, :, None] >= pos[None, None, None, :])
        # a finite floor keeps fully masked (padded) rows NaN-free; they are zeroed below
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = jnp.where(valid[:, None, :, None], probs, 0.0)
        probs = dropout(probs, self.attn_dropout, rng).astype(v.dtype)
        return jnp.einsum("bhts,bshd->bthd", probs, v)


class Block(nnx.Module):
    """Transformer block: attention and FFN residual branches, pre-LN or post-LN (``norm``)."""

    def __init__(self, mcfg: SeqRecConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, eps, std = mcfg.hidden, mcfg.layer_norm_eps, mcfg.init_std
        self.rate = mcfg.dropout
        self.post = mcfg.norm == "post"
        self.norm_attn = _layer_norm(d, eps, dtype, rngs)
        self.attn = Attention(mcfg, dtype, rngs)
        self.norm_ffn = _layer_norm(d, eps, dtype, rngs)
        self.ffn_in = _linear(d, mcfg.inner, ("embed", "mlp"), std, dtype, rngs)
        self.ffn_out = _linear(mcfg.inner, d, ("mlp", "embed"), std, dtype, rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array, rng: jax.Array | None) -> jax.Array:
        if self.post:  # RecBole: LN(x + dropout(branch(x))) for both branches
            x = self.norm_attn(x + dropout(self.attn(x, lengths, _key(rng, 0)), self.rate, _key(rng, 1)))
            return self.norm_ffn(x + dropout(self._ffn(x), self.rate, _key(rng, 2)))
        x = x + dropout(self.attn(self.norm_attn(x), lengths, _key(rng, 0)), self.rate, _key(rng, 1))
        return x + dropout(self._ffn(self.norm_ffn(x)), self.rate, _key(rng, 2))

    def _ffn(self, x: jax.Array) -> jax.Array:
        return self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False))


class SeqRec(nnx.Module):
    """The shared backbone; see the module docstring. Parameters only (dropout keys are passed)."""

    def __init__(self, mcfg: SeqRecConfig, num_items: int, max_len: int, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs, pad_rows_to: int = 1):
        check_config(mcfg)
        if num_items <= 0 or max_len <= 0:
            raise ConfigError(f"seqrec needs num_items > 0 and max_len > 0, got {num_items}, {max_len}")
        d, std = mcfg.hidden, mcfg.init_std
        self.num_items = num_items
        self.max_len = max_len
        self.rate = mcfg.dropout
        self.dtype = dtype
        normal = nnx.initializers.normal(std)
        rows = padded_rows(num_items + 2, pad_rows_to)
        self.item_embedding = EmbeddingTable(
            normal(rngs.params(), (rows, d), jnp.float32), out_sharding=("table_rows", "embed")
        )
        self.position_embedding = nnx.Param(
            normal(rngs.params(), (max_len, d), jnp.float32), out_sharding=(None, "embed")
        )
        self.blocks = nnx.List([Block(mcfg, dtype, rngs) for _ in range(mcfg.num_layers)])
        eps = mcfg.layer_norm_eps
        # pre-LN normalises the last block's output; post-LN normalises the embedding sum
        self.final_norm = _layer_norm(d, eps, dtype, rngs) if mcfg.norm == "pre" else None
        self.embed_norm = _layer_norm(d, eps, dtype, rngs) if mcfg.norm == "post" else None
        self.head = _linear(d, d, ("embed", None), std, dtype, rngs) if mcfg.output_head == "ffn" else None
        self.head_norm = _layer_norm(d, eps, dtype, rngs) if mcfg.output_head == "ffn" else None
        self.output_embedding = None if mcfg.tie_embeddings else EmbeddingTable(
            normal(rngs.params(), (rows, d), jnp.float32), out_sharding=("table_rows", "embed")
        )
        self.output_bias = nnx.Param(
            jnp.zeros((rows,), jnp.float32), out_sharding=("table_rows",)) if mcfg.output_bias else None

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    def encode(self, inputs: jax.Array, lengths: jax.Array, *, train: bool,
               rng: jax.Array | None = None) -> jax.Array:
        """``inputs [B, S] int32, lengths [B] int32 -> h [B, S, d]`` (zero at ``t >= lengths``).

        ``train=True`` applies dropout with keys derived from ``rng``; without ``rng`` a fixed
        key is used (deterministic masks, for benchmarks; the trainer always passes one).
        """
        s = inputs.shape[1]
        if s > self.max_len:
            raise ValueError(f"seqrec: input length {s} exceeds max_len {self.max_len}")
        if train and rng is None:
            rng = jax.random.key(0, impl="rbg")
        if not train:
            rng = None
        lengths = lengths.astype(jnp.int32)
        emb = gather_rows(self.item_embedding[...], inputs.reshape(-1)).reshape(*inputs.shape, -1)
        x = emb + self.position_embedding[...][:s]
        x = x.astype(self.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = dropout(x, self.rate, _key(rng, 0))
        for i, block in enumerate(self.blocks):
            x = block(x, lengths, _key(rng, i + 1))
        h = x if self.final_norm is None else self.final_norm(x)
        if self.head is not None:
            h = self.head_norm(jax.nn.gelu(self.head(h), approximate=False))
        return jnp.where((jnp.arange(s)[None, :] < lengths[:, None])[..., None], h, 0.0).astype(self.dtype)

    def output_rows(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Output vectors ``[..., d]`` and biases ``[...]`` of item ``ids`` (sampled scoring)."""
        table = self.item_embedding if self.output_embedding is None else self.output_embedding
        vecs = gather_rows(table[...], ids.reshape(-1)).reshape(*ids.shape, -1)
        if self.output_bias is None:
            return vecs, jnp.zeros(ids.shape, jnp.float32)
        return vecs, jnp.take(self.output_bias[...], ids, axis=0)

    def item_logits(self, h: jax.Array) -> jax.Array:
        """``h [..., d] -> [..., R]`` fp32 raw logits over every table row (``R >= V``; callers
        score ids ``1..num_items`` only: 0, [MASK] and padding rows are not items)."""
        table = self.item_embedding if self.output_embedding is None else self.output_embedding
        logits = jnp.einsum(
            "...d,vd->...v", h.astype(self.dtype), table[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits if self.output_bias is None else logits + self.output_bias[...]


def build(cfg: Config, info: Any, dtype: jnp.dtype, rngs: nnx.Rngs) -> SeqRec:
    """The backbone for ``cfg.model`` over ``info`` (a :class:`SequenceInfo`); ``dtype`` is
    replaced by :func:`compute_dtype` (``model.compute_dtype`` may override the trainer's)."""
    del dtype
    if not isinstance(info, SequenceInfo):
        raise ConfigError(f"model 'seqrec' is built from a SequenceInfo, got {type(info).__name__}")
    return SeqRec(cfg.model, info.num_items, info.max_len, dtype=compute_dtype(cfg), rngs=rngs,  # type: ignore[arg-type]
                  pad_rows_to=cfg.embedding.pad_rows_to)


def forward_flops_per_sequence(mcfg: SeqRecConfig, num_items: int, seq_len: int,
                               output_positions: float | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sequence's forward pass.

    Per layer: projections ``8 S d^2``; FFN ``4 S d inner``; attention ``4 S^2 d`` (softmax:
    scores and weighted sum over the full S x S, as computed), ``4 S d d_h`` (linear,
    non-causal: ``phi_k^T v`` and ``phi_q state``) or ``4 S d d_h + 4 S c d`` (linear, causal,
    chunk ``c = min(64, S)``: the XLA path's intra-chunk products). Output head
    (``output_head: ffn``): ``2 S d^2``. Output: ``2 P d V`` over ``P = output_positions``
    (default ``S``; 1 for a scoring or prefix pass; the mean gathered per row for a capped
    training step) and ``V`` ids.
    """
    s, d, dh = seq_len, mcfg.hidden, mcfg.hidden // mcfg.num_heads
    if mcfg.attention == "softmax":
        attn = 4.0 * s * s * d
    else:
        attn = 4.0 * s * d * dh + (4.0 * s * min(64, s) * d if mcfg.causal else 0.0)
    per_layer = 8.0 * s * d * d + 4.0 * s * d * mcfg.inner + attn
    p = s if output_positions is None else output_positions
    head = 2.0 * s * d * d if mcfg.output_head == "ffn" else 0.0
    return mcfg.num_layers * per_layer + head + 2.0 * p * d * (num_items + 2)


def forward_flops(cfg: Config, info: Any) -> float:
    return forward_flops_per_sequence(cfg.model, info.num_items, info.max_len)  # type: ignore[arg-type]


def activation_bytes(cfg: Config, info: Any) -> float:
    """Bytes kept for the backward pass per training sequence of the sequential backbone
    (``recjax.models.seqrec``; no rematerialisation), ``w`` bytes per compute-dtype value:

    - input: the gathered fp32 item rows and the dropped-out sum, ``S d (4 + w)``;
    - per layer: both norms' outputs, q, k, v, the attention output and its projection, the
      residual, the FFN output ``(9 S d) w``, the FFN's hidden before and after GELU
      ``(2 S F) w``; softmax attention keeps the fp32 scores and probabilities and the dropped
      probabilities ``H S^2 (8 + w)``, linear attention its chunk products ``2 H S c 4``
      (``c = min(64, S)``, causal) or per-head states ``H d_h^2 4``;
    - output: the final norm ``2 S d w``; the full softmax over ``R`` table rows keeps the fp32
      logits and their softmax, ``2 P R 4``, the sampled loss ``2 P n 4`` over ``n`` negatives
      (``P``: scored positions, 1 for prefix rows, else ``S``).
    """
    m, s = cfg.model, info.max_len
    d, f, h = m.hidden, m.inner, m.num_heads  # type: ignore[attr-defined]
    name = getattr(m, "compute_dtype", "") or cfg.train.compute_dtype
    w = 2 if name == "bfloat16" else 4
    if m.attention == "softmax":  # type: ignore[attr-defined]
        attn = h * s * s * (8 + w)
    elif m.causal:  # type: ignore[attr-defined]
        attn = 2 * h * s * min(64, s) * 4
    else:
        attn = h * (d // h) ** 2 * 4
    per_layer = (9 * s * d + 2 * s * f) * w + attn
    last_only = m.objective == "next_item" and cfg.data.sequences.train_rows == "prefixes"  # type: ignore[attr-defined]
    p = 1 if last_only else s
    if m.loss == "full":  # type: ignore[attr-defined]
        out = 2 * p * padded_rows(info.num_items + 2, cfg.embedding.pad_rows_to) * 4
    else:
        out = 2 * p * m.num_sampled * 4  # type: ignore[attr-defined]
    return float(s * d * (4 + w) + m.num_layers * per_layer + 2 * s * d * w + out)  # type: ignore[attr-defined]


register("seqrec", SeqRecConfig, build, forward_flops, task="seqrec", activation_bytes=activation_bytes)
