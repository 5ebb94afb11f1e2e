"""The decoder every family builds on: embed -> blocks (attention + MLP or MoE) -> final norm.

A family is a subclass that names itself and, where it must, overrides a hook
(``rope_inv_freq``); its Hugging Face mapping and presets sit beside it in
``models/<family>/``. The model returns final hidden states, not logits: losses apply the
head in vocabulary chunks so a [B, T, V] array never exists; ``logits`` is there for small
models, slices and decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import CACHE_AXES, MLP, Attention, RMSNorm, constrain, dtype_of, param
from models.moe import MoE


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs,
                 inv_freq: tuple[float, ...] | None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, layer_idx, rngs, inv_freq)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg, rngs) if self.is_moe else MLP(cfg, rngs)

    def __call__(self, x, positions, cache=None, valid=None, expert_ids=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), positions, cache,
                                      None if cache is not None else valid)
        x = x + h
        if self.is_moe:
            h, aux = self.mlp(self.post_attention_layernorm(x), valid, expert_ids)
        else:
            h, aux = self.mlp(self.post_attention_layernorm(x)), jnp.zeros((), jnp.float32)
        return x + h, new_cache, aux


class Decoder(nnx.Module):
    """A decoder-only LM. Call returns (hidden, cache, aux_loss); see ``models.CausalLM``."""

    family = "base"

    @staticmethod
    def rope_inv_freq(cfg: ModelConfig, layer_idx: int) -> tuple[float, ...] | None:
        """RoPE inverse frequencies of block ``layer_idx``; None = plain RoPE (families with
        scaled RoPE override)."""
        return None

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg,
                           fan_in=1)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs, self.rope_inv_freq(cfg, i))
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 cfg)

    # ------------------------------------------------------------------ the protocol
    def init_cache(self, batch: int, max_len: int, dtype=None) -> list:
        """One empty KV cache per layer (see ``Attention.init_cache``)."""
        return [Attention.init_cache(self.cfg, batch, max_len, dtype, i)
                for i in range(self.cfg.num_layers)]

    def cache_axes(self) -> list:
        """Logical axes of every leaf of ``init_cache``'s result (same structure)."""
        return [{"k": CACHE_AXES, "v": CACHE_AXES} for _ in range(self.cfg.num_layers)]

    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks with routed experts (whose routing can be recorded)."""
        return tuple(i for i in range(self.cfg.num_layers) if self.cfg.is_moe_layer(i))

    def __call__(self, tokens_BT, positions_BT=None, *, cache=None, valid_BT=None,
                 expert_ids=None):
        """Hidden states after the final norm, the updated cache (or None) and the MoE aux loss.

        ``positions_BT`` defaults to 0..T-1. With ``cache`` the tokens are written at their
        positions and attend to everything cached before them (prefill and decode alike).
        ``valid_BT`` marks real tokens (padding is excluded from the aux loss and keys).
        ``expert_ids``: {layer index: [B, T, k] int} routing to replay in those MoE blocks.
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self.embed[...][tokens_BT].astype(dtype_of(self.cfg.dtype))
        x = constrain(x, ("batch", "length", "embed"))
        new_cache, aux = [], jnp.zeros((), jnp.float32)
        for i, layer in enumerate(self.layers):
            x, c, a = layer(x, positions_BT, None if cache is None else cache[i], valid_BT,
                            None if expert_ids is None else expert_ids.get(i))
            new_cache.append(c)
            aux = aux + a
        aux = aux / max(len(self.moe_layers()), 1)
        return self.norm(x), (new_cache if cache is not None else None), aux

    def lm_head_weight(self) -> jax.Array:
        """The [D, V] output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden_BTD) -> jax.Array:
        """Float32 logits; materialises [B, T, V], so only for small vocabularies or slices.

        A tied head contracts the [V, D] embedding directly: through ``lm_head_weight()`` (a
        transposed view) XLA:CPU may copy the whole table at every decode step.
        """
        dt = hidden_BTD.dtype
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("btd,vd->btv", hidden_BTD, self.embed[...].astype(dt),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", hidden_BTD, self.lm_head[...].astype(dt),
                          preferred_element_type=jnp.float32)


def forward_with_routing(model: Decoder, *args, **kwargs):
    """``model(*args, **kwargs)`` and the experts it chose: (outputs, {layer: [B, T, k] ids}).

    The ids are what ``expert_ids=`` replays (router replay); dense blocks have no entry.
    """
    moes = {i: layer.mlp for i, layer in enumerate(model.layers) if layer.is_moe}
    for m in moes.values():
        m.record_routing = True
    try:
        out, sown = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    finally:
        for m in moes.values():
            m.record_routing = False
    sown = nnx.to_pure_dict(sown)
    return out, {i: sown["layers"][i]["mlp"]["expert_ids"][-1] for i in moes}


def token_logprobs(model: Decoder, tokens_BT) -> jax.Array:
    """log p(x_t | x_<t) for t >= 1, shape [B, T-1]; full logits, for small models and tests."""
    hidden, _, _ = model(tokens_BT)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
    return jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
