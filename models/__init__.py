"""Flax NNX model families (Qwen3 dense and MoE) and Hugging Face weight mapping.

This package imports only jax, flax, numpy and safetensors: never mopd_jax.
"""
