"""Optimizers: warm-up + decay schedule, row-wise Adagrad for tables, dense/embedding split.

``make_optimizer`` builds::

    clip_by_global_norm(grad_clip_norm)            # over ALL gradients (skipped if 0)
    -> multi_transform({"dense": <dense opt>, "embedding": <embedding opt>}, labels)

where ``labels`` is a params-shaped tree of group names chosen by variable type (the trainer
labels every :class:`~recjax.layers.embedding.EmbeddingTable` ``"embedding"`` and every
other parameter ``"dense"``, see ``recjax.train.state.param_groups``). Each group has its
own base learning rate, both follow the same schedule shape (``learning_rate_schedule``).

Every optimizer state is a plain pytree whose per-parameter leaves sit at key paths
that *end* with the parameter's key path (optax's ``mu``/``nu``, the accumulators below),
so the trainer can shard state leaves like the parameter they belong to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recjax.config import DenseOptimConfig, EmbeddingOptimConfig, OptimConfig
from recjax.errors import ConfigError

# ----------------------------------------------------------------------------- schedule


def learning_rate_schedule(cfg: OptimConfig, base_lr: float, total_steps: int) -> optax.Schedule:
    """Linear warm-up then decay; ``count`` is the number of updates already applied.

    With ``W = warmup_steps``, ``T = total_steps``, ``m = min_lr_ratio * base_lr``::

        lr(s) = base_lr * s / W                              for s < W
        p     = clip((s - W) / max(T - W, 1), 0, 1)
        cosine:   lr = m + (base_lr - m) * (1 + cos(pi p)) / 2
        linear:   lr = base_lr + (m - base_lr) * p
        constant: lr = base_lr

    so ``lr(0) = 0`` (if W > 0), ``lr(W) = base_lr`` and ``lr(T) = m`` (held after T).
    """
    warmup = max(int(cfg.warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup, 1)
    base = float(base_lr)
    floor = float(cfg.min_lr_ratio) * base
    if cfg.decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown optim.decay {cfg.decay!r}")

    def schedule(count: Any) -> jax.Array:
        s = jnp.asarray(count, jnp.float32)
        p = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
        if cfg.decay == "cosine":
            decayed = floor + (base - floor) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        elif cfg.decay == "linear":
            decayed = base + (floor - base) * p
        else:
            decayed = jnp.full_like(p, base)
        if warmup == 0:
            return decayed
        return jnp.where(s < warmup, base * s / warmup, decayed)

    return schedule


# ----------------------------------------------------------------------------- row-wise adagrad


class RowwiseAdagradState(NamedTuple):
    """``count``: int32[] updates applied; ``acc``: params-shaped tree of accumulators.

    A 2-D leaf ``[rows, dim]`` has ``acc`` ``float32[rows]``; any other leaf has an
    element-wise ``float32`` accumulator of its own shape.
    """

    count: jax.Array
    acc: Any


def rowwise_adagrad(
    learning_rate: float | optax.Schedule, eps: float = 1e-8, initial_accumulator: float = 0.0
) -> optax.GradientTransformation:
    """Row-wise Adagrad (one accumulator per embedding row), as used for large tables.

    For a 2-D leaf ``g: [rows, dim]``::

        acc[r]     += mean_j g[r, j]^2                     # float32[rows]
        update[r,:] = -lr(count) * g[r, :] / (sqrt(acc[r]) + eps)

    Rows whose gradient is zero get a zero update (their parameters are unchanged;
    their accumulator is unchanged too). Non-2-D leaves fall back to element-wise
    Adagrad with the same formula and an accumulator of the leaf's shape.
    """
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def acc_init(p: jax.Array) -> jax.Array:
        shape = p.shape[:1] if p.ndim == 2 else p.shape
        return jnp.full(shape, initial_accumulator, jnp.float32)

    def init_fn(params: Any) -> RowwiseAdagradState:
        return RowwiseAdagradState(jnp.zeros((), jnp.int32), jax.tree.map(acc_init, params))

    def update_fn(updates: Any, state: RowwiseAdagradState, params: Any = None) -> tuple[Any, Any]:
        del params
        lr = lr_fn(state.count)

        def one(g: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
            g32 = g.astype(jnp.float32)
            if g.ndim == 2:
                acc = acc + jnp.mean(jnp.square(g32), axis=1)
                denom = (jnp.sqrt(acc) + eps)[:, None]
            else:
                acc = acc + jnp.square(g32)
                denom = jnp.sqrt(acc) + eps
            step = jnp.where(denom > 0, g32 / jnp.where(denom > 0, denom, 1.0), 0.0)
            return (-lr * step).astype(g.dtype), acc

        leaves, treedef = jax.tree.flatten(updates)
        pairs = [one(g, a) for g, a in zip(leaves, treedef.flatten_up_to(state.acc), strict=True)]
        new_updates = treedef.unflatten([u for u, _ in pairs])
        new_acc = treedef.unflatten([a for _, a in pairs])
        return new_updates, RowwiseAdagradState(optax.safe_increment(state.count), new_acc)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- labels & builders


def path_keys(path: tuple) -> tuple[str, ...]:
    """A jax key path as plain strings: ``("params", "top", "layers", "0", "kernel")``."""
    return tuple(jax.tree_util.keystr(path, simple=True, separator="\0").split("\0"))


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _dense_tx(c: DenseOptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    """adamw: decoupled decay (``lr * wd * w``); adam/sgd/adagrad: L2 term ``wd * w`` added
    to the gradient. Either way only on leaves with ``ndim >= 2`` (not biases/norm scales)."""
    if c.name == "adamw":
        return optax.adamw(
            lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=_decay_mask
        )
    if c.name == "adam":
        base = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    elif c.name == "sgd":
        base = optax.sgd(lr)
    elif c.name == "adagrad":
        base = optax.adagrad(lr, eps=c.eps)
    else:
        raise ValueError(f"unknown optim.dense.name {c.name!r}")
    if c.weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(c.weight_decay, mask=_decay_mask), base)
    return base


def _embedding_tx(c: EmbeddingOptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    if c.name == "rowwise_adagrad":
        return rowwise_adagrad(lr, eps=c.eps, initial_accumulator=c.initial_accumulator)
    if c.name == "adagrad":
        return optax.adagrad(lr, initial_accumulator_value=c.initial_accumulator, eps=c.eps)
    if c.name == "sgd":
        return optax.sgd(lr)
    if c.name == "adam":
        return optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    if c.name == "lazy_adam":
        raise ConfigError(
            "optim.embedding.name=lazy_adam updates looked-up rows only (optim.embedding.update=sparse); "
            "tables updated densely use adam"
        )
    raise ValueError(f"unknown optim.embedding.name {c.name!r}")


def make_optimizer(cfg: OptimConfig, total_steps: int, labels: Any, clip: bool = True) -> optax.GradientTransformation:
    """Global-norm clipping over all grads (unless ``clip=False``: the sparse train step clips
    itself, over the dense gradients and the touched table rows together), then dense /
    embedding optimizers by ``labels`` (a params-shaped tree of ``"dense"`` / ``"embedding"``,
    or a function params -> such a tree)."""
    dense_lr = learning_rate_schedule(cfg, cfg.dense.lr, total_steps)
    emb_lr = learning_rate_schedule(cfg, cfg.embedding.lr, total_steps)
    tx = optax.multi_transform(
        {
            "dense": _dense_tx(cfg.dense, dense_lr),
            "embedding": _embedding_tx(cfg.embedding, emb_lr),
        },
        labels,
    )
    if clip and cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def optimizer_lrs(cfg: OptimConfig, total_steps: int) -> Callable[[int], dict[str, float]]:
    """``step -> {"lr_dense": ..., "lr_embedding": ...}``: the rates used by update ``step``
    (``step`` = number of updates already applied, i.e. the optax count)."""
    dense_lr = learning_rate_schedule(cfg, cfg.dense.lr, total_steps)
    emb_lr = learning_rate_schedule(cfg, cfg.embedding.lr, total_steps)

    def lrs(step: int) -> dict[str, float]:
        return {"lr_dense": float(dense_lr(step)), "lr_embedding": float(emb_lr(step))}

    return lrs
