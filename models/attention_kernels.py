"""The accelerator attention kernels behind ``models.attention.attend``: TPU splash attention
under ``shard_map``, cuDNN through ``jax.nn.dot_product_attention`` and the Pallas GPU kernel.

All three see rows without a KV cache (query i at position i, key j at position j), the
caller's layout ([B, T, H, Hd] queries, [B, K, S, *] keys and values) and return [B, T, H, Ve].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models.sharding_context import current_sharding


_LANES = 128  # splash blocks are multiples of the TPU lane width
SPLASH_RESIDUALS = "splash_residuals"  # checkpoint name of splash's saved output and logsumexp


def _pad_length(x, axis: int, to: int, value=0):
    n = x.shape[axis]
    if n % to == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - n % to)
    return jnp.pad(x, pad, constant_values=value)


@functools.lru_cache(maxsize=64)
def _splash_kernel(H: int, T: int, window, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = (sm.CausalMask((T, T)) if window is None
           else sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0))
    b = min(block, T)
    # One fused backward kernel: dQ formed beside dK, dV, so QK^T and dP are computed twice
    # per (query, key) pair in all (forward, backward), not three times (a dq kernel of its
    # own recomputes them): 7 matmuls a pair where separate kernels take 9.
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    # Its output and logsumexp carry SPLASH_RESIDUALS, so a remat policy that saves them
    # (the decoder's save_attention) does not run the forward kernel again in the backward.
    return sk.make_splash_mha(sm.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, residual_checkpoint_name=SPLASH_RESIDUALS,
                              interpret=interpret)


def _splash_local(q_BHTd, k_BKTd, v_BKTe, valid_BT, sinks_H, window, block, interpret):
    """Splash on this device's rows and heads: a vmap over rows of the [H, T, d] kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    H, T = q_BHTd.shape[1], q_BHTd.shape[2]
    kernel = _splash_kernel(H, T, window, block, interpret)

    def one(q, k, v, valid, sinks):
        seg = None if valid is None else sk.SegmentIds(q=valid, kv=valid)
        return kernel(q, k, v, seg, sinks)

    in_axes = (0, 0, 0, None if valid_BT is None else 0, None)
    return jax.vmap(one, in_axes=in_axes)(q_BHTd, k_BKTd, v_BKTe, valid_BT, sinks_H)


def splash(q_BTHd, k_BKSd, v_BKSe, k_valid_BS, window, sinks_H, scale, block, interpret):
    """TPU splash attention; rows padded to a multiple of 128 (padding is its own segment)."""
    B, T, H, Hd = q_BTHd.shape
    K = k_BKSd.shape[1]
    block = max(_LANES, min(block, -(-T // _LANES) * _LANES))
    q = _pad_length(jnp.transpose(q_BTHd * jnp.asarray(scale, q_BTHd.dtype), (0, 2, 1, 3)),
                    2, block)
    k, v = _pad_length(k_BKSd, 2, block), _pad_length(v_BKSe, 2, block)
    Tp = q.shape[2]
    valid = None
    if k_valid_BS is not None or Tp != T:
        base = jnp.ones((B, T), bool) if k_valid_BS is None else k_valid_BS.astype(bool)
        valid = _pad_length(base.astype(jnp.int32), 1, block)  # 1 real, 0 padding
    sinks = None if sinks_H is None else sinks_H.astype(jnp.float32)

    ctx = current_sharding()
    fn = functools.partial(_splash_local, window=window, block=block, interpret=interpret)
    if ctx is None or ctx.mesh is None or ctx.mesh.size == 1:
        out = fn(q, k, v, valid, sinks)
    else:
        q_spec = ctx.spec(("batch", "q_heads", "length", "head_dim"), q.shape)
        kv_spec = ctx.spec(("batch", "kv_heads", "length", "head_dim"), k.shape)
        if q_spec[1] != kv_spec[1]:  # heads shard unevenly: give every q head its kv head
            k, v = jnp.repeat(k, H // K, axis=1), jnp.repeat(v, H // K, axis=1)
            kv_spec = q_spec
        q_spec = P(q_spec[0], q_spec[1], None, None)  # whole rows on each device
        kv_spec = P(kv_spec[0], kv_spec[1], None, None)
        in_specs = (q_spec, kv_spec, kv_spec, None if valid is None else P(q_spec[0], None),
                    None if sinks is None else P(q_spec[1]))
        out = jax.shard_map(fn, mesh=ctx.mesh, in_specs=in_specs, out_specs=q_spec,
                            check_vma=False)(q, k, v, valid, sinks)
    return jnp.transpose(out[:, :, :T], (0, 2, 1, 3)).astype(v_BKSe.dtype)


def cudnn(q_BTHd, k_BKSd, v_BKSe, k_valid_BS, window, scale, implementation="cudnn"):
    """cuDNN fused attention; padding must be on the right (the key count per row).

    ``implementation='xla'`` runs the same call through XLA (how CPU tests check the mapping).
    """
    k = jnp.transpose(k_BKSd, (0, 2, 1, 3))
    v = jnp.transpose(v_BKSe, (0, 2, 1, 3))
    lengths = None if k_valid_BS is None else jnp.sum(k_valid_BS, axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q_BTHd, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


def pallas_gpu(q_BTHd, k_BKSd, v_BKSe, k_valid_BS, scale, interpret):
    """The Pallas (Triton) GPU flash kernel; GQA by repeating KV heads, padding as segments."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    B, T, H, _ = q_BTHd.shape
    K, blk = k_BKSd.shape[1], 64
    k = jnp.repeat(jnp.transpose(k_BKSd, (0, 2, 1, 3)), H // K, axis=2)
    v = jnp.repeat(jnp.transpose(v_BKSe, (0, 2, 1, 3)), H // K, axis=2)
    seg = None
    if k_valid_BS is not None or T % blk:  # padding (ours and the caller's) is segment 0
        base = jnp.ones((B, T), bool) if k_valid_BS is None else k_valid_BS.astype(bool)
        seg = _pad_length(base.astype(jnp.int32), 1, blk)
    q, k, v = (_pad_length(x, 1, blk) for x in (q_BTHd, k, v))
    sizes = gpu_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=32,
                                     block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)
    out = gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=sizes,
                            interpret=interpret)
    return out[:, :T]
