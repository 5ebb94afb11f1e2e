"""mopd-jax: Multi-Teacher On-Policy Distillation in JAX."""

__version__ = "0.1.0"
