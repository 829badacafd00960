"""Feature tokenization: raw features -> ``T`` tokens of width ``D`` (RankMixer, TokenMixer-Large).

The input is one row ``x0 = [dense, e_1, ..., e_F]`` ``[B, W]`` (dense features, then every
sparse feature's embedding). A *group* is a set of columns of ``x0``. Group ``g`` becomes
token ``g`` through its own MLP (TokenMixer-Large: ``X_g = MLP_g(concat(embeddings of group
g))``; RankMixer: one linear projection per contiguous segment). All group MLPs run as one
batched einsum over the group axis: each group's columns are gathered into a zero-padded
``[B, G, W_max]`` block (padding columns are masked to zero, so their weights never receive
gradient). TokenMixer-Large prepends a global token ``X_G = MLP_global(x0)``.

Groups come from :func:`semantic_groups` (named features per group, or contiguous runs of
features) or :func:`split_segments` (RankMixer's equal split of the concatenated vector).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.errors import ConfigError
from recjax.layers.token_mixing import fan_in_init, per_token_dense, stacked_param

Item = tuple[str, int]  # (feature name, width in x0); "dense" is the dense-feature block


def split_segments(width: int, n: int) -> list[np.ndarray]:
    """``n`` contiguous column ranges covering ``[0, width)``, sizes differing by at most one."""
    if n <= 0 or n > width:
        raise ConfigError(f"cannot split a {width}-wide feature vector into {n} tokens")
    bounds = np.linspace(0, width, n + 1).round().astype(int)
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n)]


def semantic_groups(items: Sequence[Item], n_groups: int, named: Sequence[Sequence[str]] = ()) -> list[np.ndarray]:
    """Column indices of ``x0`` per group.

    ``named``: the features of each group by name (``"dense"`` = the dense block); every
    feature must be in exactly one group. Empty: contiguous runs of whole features when
    there are at least ``n_groups`` features, else an equal split of the columns (there are
    more tokens than features, so groups cannot be whole features).
    """
    starts = np.cumsum([0] + [w for _, w in items])
    cols = {name: np.arange(starts[i], starts[i + 1]) for i, (name, _) in enumerate(items)}
    if named:
        if len(named) != n_groups:
            raise ConfigError(f"model.groups lists {len(named)} groups; the model needs {n_groups}")
        seen: dict[str, int] = {}
        for g, names in enumerate(named):
            for name in names:
                if name not in cols:
                    raise ConfigError(f"model.groups[{g}]: unknown feature '{name}'; features: {list(cols)}")
                if name in seen:
                    raise ConfigError(f"model.groups: feature '{name}' is in groups {seen[name]} and {g}")
                seen[name] = g
        missing = [n for n in cols if n not in seen]
        if missing:
            raise ConfigError(f"model.groups: features {missing} are in no group")
        return [np.concatenate([cols[n] for n in names]) for names in named]
    if len(items) >= n_groups:
        bounds = np.linspace(0, len(items), n_groups + 1).round().astype(int)
        return [np.concatenate([cols[items[j][0]] for j in range(bounds[g], bounds[g + 1])]) for g in range(n_groups)]
    return split_segments(int(starts[-1]), n_groups)


class FeatureTokenizer(nnx.Module):
    """``x0 [B, W] -> tokens [B, T, D]``: one MLP per group (+ an optional global token first).

    ``hidden``: hidden widths of every group MLP (empty = one linear map per group, as in
    RankMixer). Hidden activations are SiLU; the last layer is linear. Parameters:
    ``w{i} [G, in, out]``, ``b{i} [G, out]`` (logical ``("tokens", None, None)``).
    """

    def __init__(
        self,
        groups: Sequence[np.ndarray],
        dim: int,
        *,
        hidden: Sequence[int] = (),
        global_token: bool = False,
        input_width: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        g = len(groups)
        w_max = max(len(c) for c in groups)
        idx = np.zeros((g, w_max), np.int32)
        mask = np.zeros((g, w_max), np.float32)
        for i, c in enumerate(groups):
            idx[i, : len(c)] = c
            mask[i, : len(c)] = 1.0
        # static structure (hashable tuples, not arrays: NNX keeps them in the graph definition)
        self.idx = tuple(map(tuple, idx.tolist()))
        self.mask = tuple(map(tuple, mask.tolist()))
        self.dtype = dtype
        widths = [w_max, *hidden, dim]
        self.group_w = nnx.List([
            stacked_param(rngs, (g, a, b), ("tokens", None, None), fan_in_init()) for a, b in zip(widths, widths[1:], strict=False)
        ])
        self.group_b = nnx.List([
            stacked_param(rngs, (g, b), ("tokens", None), nnx.initializers.zeros_init()) for b in widths[1:]
        ])
        gw = [input_width, *hidden, dim] if global_token else []
        self.global_w = nnx.List([
            stacked_param(rngs, (a, b), (None, None), fan_in_init()) for a, b in zip(gw, gw[1:], strict=False)
        ])
        self.global_b = nnx.List([stacked_param(rngs, (b,), (None,), nnx.initializers.zeros_init()) for b in gw[1:]])

    @staticmethod
    def _mlp(h: jax.Array, ws: Sequence[nnx.Param], bs: Sequence[nnx.Param]) -> jax.Array:
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            h = per_token_dense(h, w[...]) + b[...].astype(h.dtype)
            if i < len(ws) - 1:
                h = jax.nn.silu(h)
        return h

    def __call__(self, x0: jax.Array) -> jax.Array:
        x0 = x0.astype(self.dtype)
        idx, mask = np.asarray(self.idx, np.int32), np.asarray(self.mask, np.float32)
        grouped = x0[:, idx] * jnp.asarray(mask, self.dtype)  # [B, G, W_max]
        tokens = self._mlp(grouped, self.group_w, self.group_b)  # [B, G, D]
        if len(self.global_w):
            glob = self._mlp(x0[:, None, :], self.global_w, self.global_b)  # [B, 1, D]
            tokens = jnp.concatenate([glob, tokens], axis=1)
        return tokens


def tokenizer_flops(groups: Sequence[np.ndarray], dim: int, hidden: Sequence[int], global_width: int | None) -> float:
    """Forward matmul FLOPs per example (padded group widths, as computed)."""
    w_max = max(len(c) for c in groups)
    widths = [w_max, *hidden, dim]
    flops = len(groups) * sum(2.0 * a * b for a, b in zip(widths, widths[1:], strict=False))
    if global_width is not None:
        gw = [global_width, *hidden, dim]
        flops += sum(2.0 * a * b for a, b in zip(gw, gw[1:], strict=False))
    return flops
