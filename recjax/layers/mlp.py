"""Multi-layer perceptron with logical sharding annotations.

``MLP(in_dim, [w_1, ..., w_L])`` maps ``x [B, in_dim] -> [B, w_L]``:
``h_0 = x``, ``h_l = act(h_{l-1} @ K_l + b_l)`` with ``K_l`` ``[w_{l-1}, w_l]`` (fp32 params,
computed in ``dtype``); the activation after the last layer only if ``final_activation``.

Kernels alternate ``("embed", "mlp")`` and ``("mlp", "embed")`` (Megatron-style column then
row parallel under the ``tensor`` axis; ``embed`` maps to FSDP); a bias carries the name
of its kernel's output axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def kernel_axes(layer_index: int) -> tuple[str, str]:
    """Logical names of the ``[in, out]`` kernel of the ``layer_index``-th layer."""
    return ("embed", "mlp") if layer_index % 2 == 0 else ("mlp", "embed")


def dense(
    in_dim: int,
    out_dim: int,
    *,
    axes: tuple[str | None, str | None],
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
    relu_init: bool = False,
    use_bias: bool = True,
) -> nnx.Linear:
    """An ``nnx.Linear`` with fp32 params annotated by ``axes`` computing in ``dtype``."""
    init = nnx.initializers.he_normal() if relu_init else nnx.initializers.glorot_normal()
    return nnx.Linear(
        in_dim,
        out_dim,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class MLP(nnx.Module):
    """``[B, in_dim] -> [B, widths[-1]]`` in ``dtype``; see the module docstring."""

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        *,
        activation: str = "relu",
        final_activation: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; one of {sorted(ACTIVATIONS)}")
        if in_dim <= 0 or any(w <= 0 for w in widths):
            raise ValueError(
                f"MLP widths must be positive, got in_dim={in_dim} widths={list(widths)}"
            )
        self.activation = activation
        self.final_activation = final_activation
        self.dtype = dtype
        self.out_dim = widths[-1] if widths else in_dim
        dims = [in_dim, *widths]
        n = len(widths)
        self.layers = nnx.List(
            [
                dense(
                    dims[i],
                    dims[i + 1],
                    axes=kernel_axes(i),
                    dtype=dtype,
                    rngs=rngs,
                    relu_init=activation == "relu" and (i < n - 1 or final_activation),
                )
                for i in range(n)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x.astype(self.dtype)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1 or self.final_activation:
                x = act(x)
        return x


def mlp_flops(in_dim: int, widths: Sequence[int]) -> float:
    """Matmul FLOPs of one example through ``MLP(in_dim, widths)``: ``sum 2 * w_{l-1} * w_l``."""
    dims = [in_dim, *widths]
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)))
