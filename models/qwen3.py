"""Qwen3 and Qwen3-MoE decoders (one family: MoE blocks appear where the config says).

The model returns final hidden states, not logits: losses apply ``lm_head`` in vocabulary
chunks so a [B, T, V] array never exists. ``logits`` is there for small models and tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, Attention, RMSNorm, constrain, dtype_of, param
from models.moe import MoE


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, layer_idx, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg, rngs) if self.is_moe else MLP(cfg, rngs)

    def __call__(self, x, positions, cache=None, valid=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), positions, cache,
                                      None if cache is not None else valid)
        x = x + h
        if self.is_moe:
            h, aux = self.mlp(self.post_attention_layernorm(x), valid)
        else:
            h, aux = self.mlp(self.post_attention_layernorm(x)), jnp.zeros((), jnp.float32)
        return x + h, new_cache, aux


class Transformer(nnx.Module):
    """Qwen3 decoder: embed -> blocks -> final norm. Call returns (hidden, cache, aux_loss)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg,
                           fan_in=1)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 cfg)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list:
        """One empty KV cache per layer (see ``Attention.init_cache``)."""
        return [Attention.init_cache(self.cfg, batch, max_len, dtype)
                for _ in range(self.cfg.num_layers)]

    def __call__(self, tokens_BT, positions_BT=None, *, cache=None, valid_BT=None):
        """Hidden states after the final norm, the updated cache (or None) and the MoE aux loss.

        ``positions_BT`` defaults to 0..T-1. With ``cache`` the tokens are written at their
        positions and attend to everything cached before them (prefill and decode alike).
        ``valid_BT`` marks real tokens (padding is excluded from the aux loss and keys).
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self.embed[...][tokens_BT].astype(dtype_of(self.cfg.dtype))
        x = constrain(x, ("batch", "length", "embed"))
        new_cache, aux = [], jnp.zeros((), jnp.float32)
        for i, layer in enumerate(self.layers):
            x, c, a = layer(x, positions_BT, None if cache is None else cache[i], valid_BT)
            new_cache.append(c)
            aux = aux + a
        n_moe = sum(self.cfg.is_moe_layer(i) for i in range(self.cfg.num_layers))
        aux = aux / max(n_moe, 1)
        return self.norm(x), (new_cache if cache is not None else None), aux

    def lm_head_weight(self) -> jax.Array:
        """The [D, V] output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden_BTD) -> jax.Array:
        """Float32 logits; materialises [B, T, V], so only for small vocabularies or slices."""
        w = self.lm_head_weight()
        return jnp.einsum("btd,dv->btv", hidden_BTD, w.astype(hidden_BTD.dtype),
                          preferred_element_type=jnp.float32)


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (eager; for sharded init use mopd_jax.sharding)."""
    return Transformer(cfg, nnx.Rngs(seed))


def token_logprobs(model: Transformer, tokens_BT) -> jax.Array:
    """log p(x_t | x_<t) for t >= 1, shape [B, T-1]; full logits, for small models and tests."""
    hidden, _, _ = model(tokens_BT)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
    return jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
