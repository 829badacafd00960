"""recjax: JAX/Flax research codebase for large recommendation models."""

__version__ = "0.1.0"
