"""Shared layers: parameters with logical axes, RMSNorm, RoPE, GQA attention with its KV cache, MLP.

Every parameter carries ``logical_axes`` metadata (e.g. ``('embed', 'mlp')``); the mopd_jax
sharding rules map those names to mesh axes per role. Activations get logical constraints via
``constrain`` which is a no-op unless a rules context is active.
"""

from __future__ import annotations

import math

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import attend
from models.sharding_context import (ShardingContext, activation_sharding, constrain,  # noqa: F401
                                     current_sharding)
from models.config import ModelConfig

Cache = dict  # {'k': [B, K, S, Hd], 'v': [B, K, S, Vd]} for one layer


def dtype_of(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def param(rngs: nnx.Rngs | None, shape, axes, cfg: ModelConfig, *, init: str = "normal",
          fan_in: int | None = None) -> nnx.Param:
    """A parameter of ``shape`` with logical ``axes``; init 'normal' (scaled), 'ones' or 'zeros'."""
    assert len(shape) == len(axes), (shape, axes)
    dtype = dtype_of(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = 1.0 / math.sqrt(fan_in if fan_in else shape[0])
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled after casting back (Hugging Face's order)."""

    def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = "norm"):
        self.weight = param(None, (dim,), (axis_name,), cfg, init="ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def default_inv_freq(cfg: ModelConfig, layer_idx: int) -> tuple[float, ...]:
    """Plain RoPE inverse frequencies over the rotated dims of block ``layer_idx``."""
    rot, theta = cfg.rotary_dim, cfg.layer_rope_theta(layer_idx)
    return tuple(float(x) for x in 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float32)
                                                   / rot)))


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, *, theta: float, rot: int,
         inv_freq: tuple[float, ...] | None = None) -> jax.Array:
    """Rotary embedding, half-split (rotate_half) convention, angles in float32.

    Rotates the leading ``rot`` dims of each head and passes the rest through (partial
    rotary, as Hugging Face's ``apply_rotary_pos_emb``). Plain RoPE's frequencies are computed
    in the graph from ``theta``; a family with scaled RoPE passes its own ``inv_freq``.
    """
    if inv_freq is None:  # in the graph, as before families: the same bits as ever
        inv = 1.0 / (theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    else:
        inv = jnp.asarray(inv_freq, jnp.float32)
    ang = positions_BT.astype(jnp.float32)[..., None] * inv
    cos = jnp.cos(ang)[:, :, None, :].astype(x_BTNH.dtype)
    sin = jnp.sin(ang)[:, :, None, :].astype(x_BTNH.dtype)
    x_rot, x_pass = x_BTNH[..., :rot], x_BTNH[..., rot:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out if rot == x_BTNH.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


def _project_heads(x_BTD, w_DNH):
    """x @ w for a [D, N, Hd] head projection, as one 2-D matmul.

    Written as ``einsum('btd,dnh->btnh')`` (and o_proj as ``'btnh,nhd->btd'``) XLA:CPU ran a
    28-layer Qwen3-0.6B decode step's projections at 6.7 GB/s instead of 23; the weights
    merge into [D, N*Hd] for free.
    """
    D, N, Hd = w_DNH.shape
    return (x_BTD @ w_DNH.reshape(D, N * Hd)).reshape(*x_BTD.shape[:-1], N, Hd)


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # logical axes of a KV cache leaf


class Attention(nnx.Module):
    """GQA self-attention; owns the KV cache.

    Per block: sliding window or full, its own KV-head count, optional QK-norm, q/k/v biases,
    a learnable per-head sink, values of another width (``v_head_dim``) scaled by a constant,
    and RoPE over a leading part of the head (``inv_freq`` from a family that scales RoPE).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs,
                 inv_freq: tuple[float, ...] | None = None):
        D, H, Hd, Vd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.value_dim
        K = cfg.kv_heads(layer_idx)
        self.cfg, self.num_kv_heads = cfg, K
        self.q_proj = param(rngs, (D, H, Hd), ("embed", "q_heads", "head_dim"), cfg, fan_in=D)
        self.k_proj = param(rngs, (D, K, Hd), ("embed", "kv_heads", "head_dim"), cfg, fan_in=D)
        self.v_proj = param(rngs, (D, K, Vd), ("embed", "kv_heads", "head_dim"), cfg, fan_in=D)
        self.o_proj = param(rngs, (H, Vd, D), ("q_heads", "head_dim", "embed"), cfg,
                            fan_in=H * Vd)
        if cfg.attention_bias:
            self.q_bias = param(None, (H, Hd), ("q_heads", "head_dim"), cfg, init="zeros")
            self.k_bias = param(None, (K, Hd), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = param(None, (K, Vd), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Hd, cfg, "head_dim")
            self.k_norm = RMSNorm(Hd, cfg, "head_dim")
        self.sinks = (param(None, (H,), ("q_heads",), cfg, init="zeros")
                      if cfg.has_sinks(layer_idx) else None)
        self.window = cfg.sliding_window if cfg.layer_type(layer_idx) == "sliding" else None
        self.rope_theta, self.inv_freq = cfg.layer_rope_theta(layer_idx), inv_freq

    # The one KV-cache definition, used by prefill and decode alike.
    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None,
                   layer_idx: int = 0) -> Cache:
        """Zeroed cache for ``batch`` rows of ``max_len`` positions; position p lives at index p.

        Layout [B, K, S, Hd] (logical ``CACHE_AXES``): batch and kv-head lead, as the attention
        dots want them. With [B, S, K, Hd] XLA transposed the whole cache of every layer at
        every decode step. Sliding layers keep all ``max_len`` positions too (the mask hides
        the old ones): memory is that of a full layer with the sliding layer's KV heads.
        """
        dtype = dtype or dtype_of(cfg.dtype)
        K = cfg.kv_heads(layer_idx)
        return {"k": jnp.zeros((batch, K, max_len, cfg.head_dim), dtype),
                "v": jnp.zeros((batch, K, max_len, cfg.value_dim), dtype)}

    def __call__(self, x_BTD, positions_BT, cache: Cache | None = None,
                 kv_valid_BS: jax.Array | None = None):
        """Attend causally by position. With ``cache``, write this chunk's K/V at its positions
        (rows start at ``positions_BT[:, 0]``) and attend over the whole cache.

        ``kv_valid_BS`` (no cache only) marks real keys; causality alone already hides right
        padding from real queries.
        """
        cfg = self.cfg
        dt = x_BTD.dtype
        q = _project_heads(x_BTD, self.q_proj[...].astype(dt))
        k = _project_heads(x_BTD, self.k_proj[...].astype(dt))
        v = _project_heads(x_BTD, self.v_proj[...].astype(dt))
        if cfg.attention_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.attention_value_scale != 1.0:
            v = v * jnp.asarray(cfg.attention_value_scale, dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        kw = dict(theta=self.rope_theta, rot=cfg.rotary_dim, inv_freq=self.inv_freq)
        q, k = rope(q, positions_BT, **kw), rope(k, positions_BT, **kw)
        q = constrain(q, ("batch", "length", "q_heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))

        k_BKTd, v_BKTd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is None:
            keys, values, k_pos_BS = k_BKTd, v_BKTd, positions_BT
            new_cache = None
        else:
            start_B = positions_BT[:, 0]
            write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, 1))
            keys = write(cache["k"], k_BKTd.astype(cache["k"].dtype), start_B)
            values = write(cache["v"], v_BKTd.astype(cache["v"].dtype), start_B)
            new_cache = {"k": keys, "v": values}
            S = keys.shape[2]
            k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype),
                                        (x_BTD.shape[0], S))
            keys, values = keys.astype(dt), values.astype(dt)

        sinks = None if self.sinks is None else self.sinks[...]
        out = attend(q, keys, values, q_pos_BT=positions_BT, k_pos_BS=k_pos_BS,
                     k_valid_BS=kv_valid_BS if cache is None else None, window=self.window,
                     sinks_H=sinks, impl=cfg.attention_impl, cached=cache is not None)
        B, T, H, Vd = out.shape
        y = out.reshape(B, T, H * Vd) @ self.o_proj[...].astype(dt).reshape(H * Vd, -1)
        return constrain(y, ("batch", "length", "embed")), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, width: int | None = None):
        D, F = cfg.hidden_size, width or cfg.intermediate_size
        self.gate_proj = param(rngs, (D, F), ("embed", "mlp"), cfg)
        self.up_proj = param(rngs, (D, F), ("embed", "mlp"), cfg)
        self.down_proj = param(rngs, (F, D), ("mlp", "embed"), cfg)

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        g = x_BTD @ self.gate_proj[...].astype(dt)
        u = x_BTD @ self.up_proj[...].astype(dt)
        h = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
        return h @ self.down_proj[...].astype(dt)
