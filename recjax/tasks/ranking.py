"""Leave-one-out ranking metrics: the target's rank among candidates, then HR, NDCG, MRR.

Scores are ``[U, V]`` over every item id (``V = num_items + 2``: id 0 is padding and
``V - 1`` the [MASK] token; neither is ever a candidate). For user ``u`` with target
``y_u`` and candidate set ``C_u`` (all items, minus ``exclude``d ones, minus the target)::

    rank_u = 1 + |{c in C_u : s[u, c] > s[u, y_u]}|          1-based
    HR@K   = mean_u [rank_u <= K]
    NDCG@K = mean_u [rank_u <= K] / log2(rank_u + 1)          one relevant item: IDCG = 1
    MRR    = mean_u 1 / rank_u                                over the full list

Ties: only candidates scoring *strictly* higher count, so a tie goes to the target (the
optimistic rule). A model with many tied scores is flattered by it, so the device
functions also return each user's number of ties and :func:`ranking_metrics` reports
``tie_frac``, the share of users whose target ties with some candidate.

``exclude`` (``ranking.mask_history``) removes the user's past items from the candidates;
it never removes the target itself, so a re-consumed target is still ranked.
Sampled protocol: the candidates are ``n`` sampled negatives instead of all items.

Host functions (numpy) are the spec and serve small inputs and tests; the ``*_jax``
functions compute the same ranks inside the jitted evaluation step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recjax.config import RankingConfig


def _exclusion_mask(exclude, num_users: int, num_ids: int) -> np.ndarray:
    if exclude is None:
        return np.zeros((num_users, num_ids), bool)
    if isinstance(exclude, tuple):
        offsets, items = (np.asarray(a) for a in exclude)
        if offsets.shape != (num_users + 1,):
            raise ValueError(f"exclude CSR offsets must have shape [{num_users + 1}], got {offsets.shape}")
        mask = np.zeros((num_users, num_ids), bool)
        rows = np.repeat(np.arange(num_users), np.diff(offsets))
        mask[rows, items[offsets[0]:offsets[-1]]] = True
        return mask
    mask = np.asarray(exclude, bool)
    if mask.shape != (num_users, num_ids):
        raise ValueError(f"exclude mask must have shape {(num_users, num_ids)}, got {mask.shape}")
    return mask.copy()


def target_ranks(scores, targets, exclude=None) -> np.ndarray:
    """1-based ranks ``int64 [U]`` of ``targets`` in ``scores [U, V]``; see the module docstring.

    ``exclude``: None, a bool mask ``[U, V]``, or a CSR pair ``(offsets [U + 1], item ids)``.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    u, v = scores.shape
    if targets.shape != (u,):
        raise ValueError(f"targets must have shape [{u}], got {targets.shape}")
    bad = (targets < 1) | (targets > v - 2)
    if np.any(bad):
        raise ValueError(f"targets must be item ids in 1..{v - 2}, got {targets[bad][:5]}")
    candidate = ~_exclusion_mask(exclude, u, v)
    candidate[:, [0, v - 1]] = False
    candidate[np.arange(u), targets] = False
    target_score = scores[np.arange(u), targets][:, None]
    return 1 + np.sum((scores > target_score) & candidate, axis=1).astype(np.int64)


def sampled_ranks(target_scores, negative_scores) -> np.ndarray:
    """1-based ranks ``int64 [U]`` of the target among itself and ``negative_scores [U, n]``."""
    t = np.asarray(target_scores)[:, None]
    return 1 + np.sum(np.asarray(negative_scores) > t, axis=1).astype(np.int64)


def ranking_metrics(ranks, ks: Sequence[int], ties=None) -> dict[str, float]:
    """``{"hr@k", "ndcg@k" for k in ks, "mrr", "users"}`` (+ ``tie_frac`` given ``ties [U]``)."""
    r = np.asarray(ranks, np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-d array, got shape {r.shape}")
    if np.any(r < 1):
        raise ValueError("ranks are 1-based; got a rank < 1")
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"hr@{k}"] = float(np.mean(hit))
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)))
    out["mrr"] = float(np.mean(1.0 / r))
    out["users"] = int(r.size)
    if ties is not None:
        out["tie_frac"] = float(np.mean(np.asarray(ties) > 0))
    return out


def protocol_name(rcfg: RankingConfig, num_items: int) -> str:
    """One line that names the evaluation protocol, printed with every result."""
    if rcfg.protocol == "full":
        masked = "history masked" if rcfg.mask_history else "history not masked"
        return f"leave-one-out, full ranking over {num_items} items, {masked}"
    return f"leave-one-out, target vs {rcfg.num_negatives} {rcfg.negatives}-sampled negatives"


# ----------------------------------------------------------------------------- on device


def full_ranks_jax(scores: jax.Array, targets: jax.Array,
                   exclude_ids: jax.Array | None = None, *,
                   num_items: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Device :func:`target_ranks`: ``scores [B, R]``, ``targets [B]``, ``exclude_ids [B, H]``
    (item ids to exclude, 0-padded) -> ``(ranks int32 [B], ties int32 [B])``. The candidates
    are ids ``1..num_items`` (default ``R - 2``: pad and [MASK] excluded; any further columns,
    e.g. a padded table's rows, are not items)."""
    b, v = scores.shape
    n = v - 2 if num_items is None else num_items
    ids = jnp.arange(v)[None, :]
    candidate = (ids >= 1) & (ids <= n) & (ids != targets[:, None])
    if exclude_ids is not None:
        excluded = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], exclude_ids].set(True)
        candidate = candidate & ~excluded
    t = jnp.take_along_axis(scores, targets[:, None], axis=1)
    ranks = 1 + jnp.sum((scores > t) & candidate, axis=1, dtype=jnp.int32)
    ties = jnp.sum((scores == t) & candidate, axis=1, dtype=jnp.int32)
    return ranks, ties


def sampled_ranks_jax(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Device :func:`sampled_ranks`: ``scores [B, 1 + n]`` with the target in column 0."""
    t = scores[:, :1]
    ranks = 1 + jnp.sum(scores[:, 1:] > t, axis=1, dtype=jnp.int32)
    ties = jnp.sum(scores[:, 1:] == t, axis=1, dtype=jnp.int32)
    return ranks, ties
