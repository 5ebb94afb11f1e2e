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
from jax.ad_checkpoint import checkpoint_name

from models.attention_kernels import SPLASH_RESIDUALS
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

    def mlp_records(self) -> bool:
        """Whether this block's MoE is recording its routing (``forward_with_routing``)."""
        return self.is_moe and self.mlp.record_routing

    def __call__(self, x, positions, cache=None, valid=None, expert_ids=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), positions, cache,
                                      None if cache is not None else valid)
        x = x + checkpoint_name(h, "attn_out")
        if self.is_moe:
            h, aux = self.mlp(self.post_attention_layernorm(x), valid, expert_ids)
        else:
            h, aux = self.mlp(self.post_attention_layernorm(x)), jnp.zeros((), jnp.float32)
        return x + checkpoint_name(h, "moe_out" if self.is_moe else "mlp_out"), new_cache, aux


def scans(cfg: ModelConfig) -> bool:
    """Whether the blocks run as a layer scan (``model.scan_layers``; None = 16+ layers)."""
    return cfg.scan_layers if cfg.scan_layers is not None else cfg.num_layers >= 16


def layer_groups(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
    """(first layer, count) of each run of identical blocks: same attention kind, KV heads,
    sinks, RoPE theta and MLP kind. A scanned model stacks each run's parameters."""
    def sig(i):
        return (cfg.is_moe_layer(i), cfg.layer_type(i), cfg.kv_heads(i), cfg.has_sinks(i),
                cfg.layer_rope_theta(i))
    groups, start = [], 0
    for i in range(1, cfg.num_layers + 1):
        if i == cfg.num_layers or sig(i) != sig(start):
            groups.append((start, i - start))
            start = i
    return tuple(groups)


def _stack(layers: list[DecoderLayer]) -> DecoderLayer:
    """One block whose every parameter gains a leading ``layers`` axis (the run's layers)."""
    template = layers[0]
    gdef, *states = [nnx.split(layer) for layer in layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[st for _, st in [gdef, *states]])
    for _, var in nnx.to_flat_state(stacked):
        axes = var.get_metadata().get("logical_axes")
        if axes is not None:
            var.set_metadata(logical_axes=("layers", *axes))
    nnx.update(template, stacked)
    return template


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    names = ("attn_out", "moe_out", "mlp_out", SPLASH_RESIDUALS)
    return {"full": None, "save_dots": cp.dots_with_no_batch_dims_saveable,
            "save_attention": cp.save_only_these_names(*names),
            "offload": cp.save_and_offload_only_these_names(
                names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
                offload_src="device", offload_dst="pinned_host")}[name]


def _block_fn(gdef, cfg: ModelConfig, record: bool, *, scanned: bool):
    """A pure ``(params, x, positions, cache, valid, expert_ids) -> (x, cache, aux, ids)``
    for one block, under the model's remat policy."""
    def fn(state, x, positions, cache, valid, expert_ids):
        layer = nnx.merge(gdef, state)
        if not record:
            x, c, a = layer(x, positions, cache, valid, expert_ids)
            return x, c, a, None
        (x, c, a), sown = nnx.capture(layer, nnx.Intermediate)(x, positions, cache, valid,
                                                               expert_ids)
        return x, c, a, nnx.to_pure_dict(sown)["mlp"]["expert_ids"][-1]
    if cfg.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_remat_policy(cfg.remat), prevent_cse=not scanned)


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
        layers = [DecoderLayer(cfg, i, rngs, self.rope_inv_freq(cfg, i))
                  for i in range(cfg.num_layers)]
        if scans(cfg):  # one stacked block per run of identical layers (``layer_groups``)
            self.groups = layer_groups(cfg)
            self.blocks = nnx.List([_stack(layers[a:a + n]) for a, n in self.groups])
        else:
            self.layers = nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 cfg)

    # ------------------------------------------------------------------ the protocol
    def init_cache(self, batch: int, max_len: int, dtype=None) -> list:
        """One empty KV cache per layer (see ``Attention.init_cache``); a scanned model has one
        per run of layers, each leaf with a leading ``layers`` axis."""
        if scans(self.cfg):
            return [jax.tree.map(lambda x, n=n: jnp.broadcast_to(x, (n, *x.shape)),
                                 Attention.init_cache(self.cfg, batch, max_len, dtype, a))
                    for a, n in self.groups]
        return [Attention.init_cache(self.cfg, batch, max_len, dtype, i)
                for i in range(self.cfg.num_layers)]

    def cache_axes(self) -> list:
        """Logical axes of every leaf of ``init_cache``'s result (same structure)."""
        if scans(self.cfg):
            axes = ("layers", *CACHE_AXES)
            return [{"k": axes, "v": axes} for _ in self.groups]
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
        new_cache, aux, routing = [], jnp.zeros((), jnp.float32), {}
        if scans(self.cfg):
            for g, ((a0, n), block) in enumerate(zip(self.groups, self.blocks)):
                x, c, a, ids = self._scan_group(block, a0, n, x, positions_BT,
                                                None if cache is None else cache[g], valid_BT,
                                                expert_ids)
                new_cache.append(c)
                aux = aux + a
                routing.update({a0 + j: ids[j] for j in range(n)} if ids is not None else {})
        else:
            for i, layer in enumerate(self.layers):
                c_i = None if cache is None else cache[i]
                e_i = None if expert_ids is None else expert_ids.get(i)
                if self.cfg.remat == "none" and not layer.mlp_records():
                    x, c, a = layer(x, positions_BT, c_i, valid_BT, e_i)
                else:
                    gdef, state = nnx.split(layer)
                    fn = _block_fn(gdef, self.cfg, layer.mlp_records(), scanned=False)
                    x, c, a, ids = fn(state, x, positions_BT, c_i, valid_BT, e_i)
                    if ids is not None:
                        routing[i] = ids
                new_cache.append(c)
                aux = aux + a
        if routing:
            self.sow(nnx.Intermediate, "routing", routing)
        aux = aux / max(len(self.moe_layers()), 1)
        return self.norm(x), (new_cache if cache is not None else None), aux

    def _scan_group(self, block, first: int, n: int, x, positions, cache, valid, expert_ids):
        """Layers first..first+n-1 as one ``lax.scan`` over the stacked block."""
        gdef, state = nnx.split(block)
        record = block.mlp_records()
        fn = _block_fn(gdef, self.cfg, record, scanned=True)
        ids_in = None
        if expert_ids is not None and block.is_moe:
            ids_in = jnp.stack([expert_ids[first + j] for j in range(n)])

        def body(carry, xs):
            h, aux = carry
            st, c, e = xs
            h, c, a, ids = fn(st, h, positions, c, valid, e)
            return (h, aux + a), (c, ids)

        (x, aux), (new_cache, ids) = jax.lax.scan(
            body, (x, jnp.zeros((), jnp.float32)), (state, cache, ids_in))
        return x, new_cache, aux, ids

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
    blocks = model.blocks if scans(model.cfg) else model.layers
    moes = [layer.mlp for layer in blocks if layer.is_moe]
    for m in moes:
        m.record_routing = True
    try:
        out, sown = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    finally:
        for m in moes:
            m.record_routing = False
    sown = nnx.to_pure_dict(sown)
    return out, {int(i): ids for i, ids in sown.get("routing", [{}])[-1].items()}


def token_logprobs(model: Decoder, tokens_BT) -> jax.Array:
    """log p(x_t | x_<t) for t >= 1, shape [B, T-1]; full logits, for small models and tests."""
    hidden, _, _ = model(tokens_BT)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
    return jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
