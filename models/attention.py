"""Attention backends behind one function, ``attend``: reference, blockwise, splash, cuDNN and
the Pallas GPU kernel compute the same causal GQA attention.

What every backend computes, for queries at positions ``q_pos`` and keys at ``k_pos``: key j is
visible to query i iff ``k_pos[j] <= q_pos[i]``, ``k_valid[j]``, and (sliding layers)
``q_pos[i] - k_pos[j] < window``; softmax over the visible keys in fp32, plus a per-head sink
logit in the denominator where the layer has sinks; probabilities times values.

  * ``reference``: the dense [B, K, G, T, S] scores and a [B, T, S] mask; the tests' oracle.
  * ``blockwise``: pure JAX online softmax over key blocks with a custom VJP (FlashAttention-2's
    backward, recomputing each block), so memory grows linearly with T; blocks that the
    positions rule out (above the causal diagonal, outside the window, past the live part of a
    KV cache) are skipped with ``lax.cond``. The default off TPU/GPU for rows longer than one
    block, and the decode path everywhere.
  * ``splash``: TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``)
    under ``shard_map``: causal or local mask, GQA, sinks, padding as segment ids. Rows without
    a KV cache only (positions 0..T-1, which is how train and score steps call it).
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``; right padding as key
    lengths, sliding windows as ``local_window_size``. No sinks, equal q/k and v widths.
  * ``pallas_gpu``: ``jax.experimental.pallas.ops.gpu.attention.mha``; causal, segment ids,
    equal widths; no sinks or windows.

A backend asked for something it cannot do (sinks on cuDNN, a cached decode on splash) hands
that call to ``blockwise``, which does everything; ``resolve`` says which one runs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.sharding_context import current_sharding

IMPLS = ("auto", "reference", "blockwise", "splash", "cudnn", "pallas_gpu")
BLOCK = 512          # default query and key block of the blockwise and splash kernels
_NEG = -1e30         # masked logit: finite, so exp(_NEG - _NEG) stays 1 and never NaN


def resolve(impl: str, *, T: int, S: int, cached: bool, sinks: bool, window, same_width: bool,
            platform: str | None = None, block: int | None = None) -> str:
    """The backend that will run for these shapes and features (``impl`` may be 'auto').

    The platform is that of the active mesh (``models.layers.current_sharding``; a libtpu
    compile-only mesh is 'tpu' in a CPU process), else JAX's default backend."""
    platform = platform or _platform()
    if impl == "auto":
        if platform == "tpu" and not cached:
            impl = "splash"
        elif platform == "gpu" and not cached:
            impl = "cudnn"
        else:
            return "reference" if S <= (block or BLOCK) else "blockwise"
    if impl == "splash" and cached:
        return "blockwise"
    if impl == "cudnn" and (cached or sinks or not same_width):
        return "blockwise"
    if impl == "pallas_gpu" and (cached or sinks or window is not None or not same_width):
        return "blockwise"
    return impl


def _platform() -> str:
    ctx = current_sharding()
    if ctx is not None and ctx.mesh is not None:
        return ctx.mesh.devices.flat[0].platform
    return jax.default_backend()


def attend(q_BTHd, k_BKSd, v_BKSe, *, q_pos_BT, k_pos_BS, k_valid_BS=None, window=None,
           sinks_H=None, impl: str = "auto", cached: bool = False, block: int | None = None,
           interpret: bool = False):
    """Causal GQA attention: [B, T, H, Hd] queries over [B, K, S, Hd] keys and [B, K, S, Ve]
    values -> [B, T, H, Ve] (the values' dtype).

    ``cached``: keys come from a KV cache (decode / chunked prefill); ``interpret`` runs the
    Pallas kernels in interpret mode (CPU tests).
    """
    B, T, H, Hd = q_BTHd.shape
    K, S = k_BKSd.shape[1], k_BKSd.shape[2]
    block = block or BLOCK
    impl = resolve(impl, T=T, S=S, cached=cached, sinks=sinks_H is not None, window=window,
                   same_width=v_BKSe.shape[-1] == Hd, block=block)
    scale = 1.0 / math.sqrt(Hd)
    if impl == "reference":
        return reference(q_BTHd, k_BKSd, v_BKSe, q_pos_BT, k_pos_BS, k_valid_BS, window,
                         sinks_H, scale)
    if impl == "blockwise":
        return blockwise(q_BTHd, k_BKSd, v_BKSe, q_pos_BT, k_pos_BS, k_valid_BS, window,
                         sinks_H, scale, block)
    if impl == "splash":
        from models.attention_kernels import splash
        return splash(q_BTHd, k_BKSd, v_BKSe, k_valid_BS, window, sinks_H, scale, block,
                      interpret)
    if impl == "cudnn":
        from models.attention_kernels import cudnn
        return cudnn(q_BTHd, k_BKSd, v_BKSe, k_valid_BS, window, scale)
    if impl == "pallas_gpu":
        from models.attention_kernels import pallas_gpu
        return pallas_gpu(q_BTHd, k_BKSd, v_BKSe, k_valid_BS, scale, interpret)
    raise ValueError(f"model.attention_impl: unknown {impl!r}; one of {', '.join(IMPLS)}")


def visible(q_pos_BT, k_pos_BS, k_valid_BS, window):
    """[B, T, S] bool: which keys each query sees (the one mask rule of every backend)."""
    q, k = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    mask = k <= q
    if window is not None:  # transformers: key j visible to query i iff i - j < window
        mask &= k > q - window
    if k_valid_BS is not None:
        mask &= k_valid_BS[:, None, :]
    return mask


# ----------------------------------------------------------------------------- reference
def reference(q_BTHd, k_BKSd, v_BKSe, q_pos_BT, k_pos_BS, k_valid_BS, window, sinks_H, scale):
    B, T, H, Hd = q_BTHd.shape
    K = k_BKSd.shape[1]
    q = q_BTHd.reshape(B, T, K, H // K, Hd)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_BKSd,
                        preferred_element_type=jnp.float32) * scale
    mask_BTS = visible(q_pos_BT, k_pos_BS, k_valid_BS, window)
    scores = jnp.where(mask_BTS[:, None, None], scores, -jnp.inf)
    if sinks_H is not None:
        sink = sinks_H.astype(jnp.float32).reshape(1, K, H // K, 1, 1)
        m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
        e = jnp.exp(scores - m)
        probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksh->btkgh", probs.astype(v_BKSe.dtype), v_BKSe)
    return out.reshape(B, T, H, v_BKSe.shape[-1])


# ----------------------------------------------------------------------------- blockwise
def blockwise(q_BTHd, k_BKSd, v_BKSe, q_pos_BT, k_pos_BS, k_valid_BS, window, sinks_H, scale,
              block: int = BLOCK):
    """Online-softmax attention over key blocks (custom VJP); memory linear in T and S."""
    B, T, H, Hd = q_BTHd.shape
    K, S, E = k_BKSd.shape[1], k_BKSd.shape[2], v_BKSe.shape[-1]
    G = H // K
    bq, bk = min(block, T), min(block, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    q = q_BTHd.reshape(B, T, K, G, Hd)
    q_pos = q_pos_BT.astype(jnp.int32)
    k_pos = k_pos_BS.astype(jnp.int32)
    k_valid = (jnp.ones((B, S), bool) if k_valid_BS is None else k_valid_BS.astype(bool))
    if Tp != T:  # padded queries sit at position -1: they see nothing and are sliced off
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, Tp - T)), constant_values=-1)
    if Sp != S:
        pad = ((0, 0), (0, 0), (0, Sp - S), (0, 0))
        k_BKSd, v_BKSe = jnp.pad(k_BKSd, pad), jnp.pad(v_BKSe, pad)
        k_pos = jnp.pad(k_pos, ((0, 0), (0, Sp - S)))
        k_valid = jnp.pad(k_valid, ((0, 0), (0, Sp - S)))
    has_sinks = sinks_H is not None
    sinks = (sinks_H.astype(jnp.float32).reshape(K, G) if has_sinks
             else jnp.zeros((K, G), jnp.float32))
    out = _flash(q, k_BKSd, v_BKSe, q_pos, k_pos, k_valid, sinks,
                 window if window is not None else -1, float(scale), bq, bk, has_sinks)
    return out[:, :T].reshape(B, T, H, E)


def _blocks(x, axis: int, size: int):
    """Split ``axis`` into [n, size] and move the block index to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _bounds(pos_nB, valid_nB=None):
    """Per block: the lowest and highest (valid) position, over the batch."""
    big = jnp.iinfo(jnp.int32).max // 2
    lo_pos = pos_nB if valid_nB is None else jnp.where(valid_nB, pos_nB, big)
    hi_pos = pos_nB if valid_nB is None else jnp.where(valid_nB, pos_nB, -big)
    axes = tuple(range(1, pos_nB.ndim))
    return jnp.min(lo_pos, axis=axes), jnp.max(hi_pos, axis=axes)


def _needed(qmin, qmax, kmin, kmax, window):
    """Can any query of this block see any key of that block?"""
    need = kmin <= qmax
    if window > 0:
        need &= kmax > qmin - window
    return need


def _block_mask(qp_Bq, kp_Bk, kv_Bk, window):
    m = kp_Bk[:, None, :] <= qp_Bq[:, :, None]
    if window > 0:
        m &= kp_Bk[:, None, :] > qp_Bq[:, :, None] - window
    return m & kv_Bk[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, q_pos, k_pos, k_valid, sinks, window, scale, bq, bk, has_sinks):
    return _flash_fwd(q, k, v, q_pos, k_pos, k_valid, sinks, window, scale, bq, bk,
                      has_sinks)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, k_valid, sinks, window, scale, bq, bk, has_sinks):
    B, T, K, G, _ = q.shape
    E = v.shape[-1]
    k_n, v_n = _blocks(k, 2, bk), _blocks(v, 2, bk)            # [nk, B, K, bk, *]
    kp_n, kv_n = _blocks(k_pos, 1, bk), _blocks(k_valid, 1, bk)  # [nk, B, bk]
    kmin_n, kmax_n = _bounds(kp_n, kv_n)

    def q_block(args):
        q_i, qp_i = args                                          # [B, bq, K, G, d], [B, bq]
        qmin, qmax = _bounds(qp_i[None])
        qmin, qmax = qmin[0], qmax[0]

        def kv_step(carry, xs):
            k_j, v_j, kp_j, kv_j, kmin, kmax = xs

            def compute(c):
                m, l, acc = c
                s = jnp.einsum("btkgd,bksd->bkgts", q_i, k_j,
                               preferred_element_type=jnp.float32) * scale
                mask = _block_mask(qp_i, kp_j, kv_j, window)[:, None, None]
                s = jnp.where(mask, s, _NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None]) * mask
                alpha = jnp.exp(m - m_new)
                acc = acc * alpha[..., None] + jnp.einsum(
                    "bkgts,bkse->bkgte", p.astype(v_j.dtype), v_j,
                    preferred_element_type=jnp.float32)
                return m_new, l * alpha + jnp.sum(p, axis=-1), acc

            return jax.lax.cond(_needed(qmin, qmax, kmin, kmax, window), compute,
                                lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), _NEG, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, E), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (k_n, v_n, kp_n, kv_n, kmin_n, kmax_n))
        if has_sinks:
            sink = sinks[None, :, :, None]
            m_f = jnp.maximum(m, sink)
            corr = jnp.exp(m - m_f)
            l, acc, m = l * corr + jnp.exp(sink - m_f), acc * corr[..., None], m_f
        live = l > 0
        out = jnp.where(live[..., None], acc / jnp.where(live, l, 1.0)[..., None], 0.0)
        lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), 0.0)
        return out, lse                                           # [B,K,G,bq,E], [B,K,G,bq]

    out_n, lse_n = jax.lax.map(q_block, (_blocks(q, 1, bq), _blocks(q_pos, 1, bq)))
    out = jnp.moveaxis(out_n, 0, 3).reshape(B, K, G, T, E)       # [B, K, G, T, E]
    lse = jnp.moveaxis(lse_n, 0, 3).reshape(B, K, G, T)
    out_BTKGE = jnp.transpose(out, (0, 3, 1, 2, 4)).astype(v.dtype)
    return out_BTKGE, (q, k, v, q_pos, k_pos, k_valid, sinks, out_BTKGE, lse)


def _flash_bwd(window, scale, bq, bk, has_sinks, res, d_out):
    q, k, v, q_pos, k_pos, k_valid, sinks, out, lse = res
    B, T, K, G, Hd = q.shape
    do = d_out.astype(jnp.float32)                                # [B, T, K, G, E]
    D = jnp.einsum("btkge,btkge->bkgt", do, out.astype(jnp.float32))
    q_n, do_n = _blocks(q, 1, bq), _blocks(do, 1, bq)             # [nq, B, bq, K, G, *]
    qp_n = _blocks(q_pos, 1, bq)
    lse_n, D_n = _blocks(lse, 3, bq), _blocks(D, 3, bq)           # [nq, B, K, G, bq]
    qmin_n, qmax_n = _bounds(qp_n)
    k_n, v_n = _blocks(k, 2, bk), _blocks(v, 2, bk)
    kp_n, kv_n = _blocks(k_pos, 1, bk), _blocks(k_valid, 1, bk)
    kmin_n, kmax_n = _bounds(kp_n, kv_n)
    nq = q_n.shape[0]

    def kv_block(dq, xs):
        k_j, v_j, kp_j, kv_j, kmin, kmax = xs

        def q_step(carry, i):
            def compute(c):
                dk, dv, dq = c
                q_i, do_i, qp_i = q_n[i], do_n[i], qp_n[i]
                s = jnp.einsum("btkgd,bksd->bkgts", q_i, k_j,
                               preferred_element_type=jnp.float32) * scale
                mask = _block_mask(qp_i, kp_j, kv_j, window)[:, None, None]
                p = jnp.exp(s - lse_n[i][..., None]) * mask
                dv = dv + jnp.einsum("bkgts,btkge->bkse", p, do_i)
                dp = jnp.einsum("btkge,bkse->bkgts", do_i, v_j.astype(jnp.float32))
                ds = p * (dp - D_n[i][..., None]) * scale
                dk = dk + jnp.einsum("bkgts,btkgd->bksd", ds, q_i.astype(jnp.float32))
                dq_i = jnp.einsum("bkgts,bksd->btkgd", ds, k_j.astype(jnp.float32))
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 1) + dq_i, i * bq, 1)
                return dk, dv, dq

            need = _needed(qmin_n[i], qmax_n[i], kmin, kmax, window)
            return jax.lax.cond(need, compute, lambda c: c, carry), None

        init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32), dq)
        (dk, dv, dq), _ = jax.lax.scan(q_step, init, jnp.arange(nq))
        return dq, (dk, dv)

    dq, (dk_n, dv_n) = jax.lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32),
                                    (k_n, v_n, kp_n, kv_n, kmin_n, kmax_n))
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(  # noqa: E731
        x.shape[1], x.shape[2], -1, x.shape[-1])
    dk, dv = unblock(dk_n), unblock(dv_n)
    if has_sinks:  # d sink = -sum_t p_sink(t) * (dO . O)(t)
        p_sink = jnp.exp(sinks[None, :, :, None] - lse)
        dsinks = -jnp.sum(p_sink * D, axis=(0, 3))
    else:
        dsinks = jnp.zeros_like(sinks)
    float0 = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), float0(q_pos),
            float0(k_pos), float0(k_valid), dsinks)


_flash.defvjp(_flash_fwd, _flash_bwd)
