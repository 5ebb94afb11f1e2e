"""Flax NNX model families behind one seam, and their Hugging Face weight mapping.

``build(cfg, rngs)`` makes a model of ``cfg.family`` (``registry.FAMILIES``); every family
implements ``protocol.CausalLM``. This package imports only jax, flax, numpy and
safetensors: never mopd_jax.
"""

from models.decoder import forward_with_routing, token_logprobs
from models.protocol import CausalLM
from models.registry import FAMILIES, build

__all__ = ["FAMILIES", "CausalLM", "build", "forward_with_routing", "token_logprobs"]
