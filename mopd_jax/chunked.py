"""Log-softmax reductions over the vocabulary that never build a [tokens, V] array.

Every quantity the losses need (log-probs at given ids, entropy, reverse/forward KL, JSD, the
top-k distillation term) is a per-token sum over vocabulary columns of a function of the
log-probs. `vocab_reduce` computes such sums tile by tile: the flattened tokens are cut into
chunks of `seq_chunk` rows, the vocabulary into chunks of `vocab_chunk` columns, and only one
[n, c] tile of logits (fp32, whatever the input dtype) is alive at a time. Its custom VJP
recomputes the tiles in the backward pass, so the gradient w.r.t. hidden states and `lm_head`
stores no [N, V] array either.

Chunks are strided, not contiguous: row chunk i holds tokens i, i + R, i + 2R, ... (R chunks)
and column chunk j holds vocabulary ids j, j + C, j + 2C, ... That is a reshape [N] -> [n, R]
followed by indexing the unsharded R axis, so when tokens are sharded over data-parallel devices
or `lm_head` columns over tensor-parallel ones, every tile is spread evenly over the devices
instead of living on one of them. Sizes that the chunks do not divide are padded (zero hidden
rows, zero `lm_head` columns whose logits are masked to -1e30); pick chunks that divide N and V
to avoid the pad copies.

Under a mesh (``models.sharding_context``) every tile is split, not replicated: the vocabulary
chunk is rounded up to a multiple of 128 and of the devices the 'vocab' axis spans (a chunk of
7,997 columns that 4 tensor devices do not divide made XLA replicate the tile matmuls, 4x each
device's share), the row chunk to a multiple of the 'tokens' devices, and the chunked operands
are constrained to hidden rows over 'tokens', `lm_head` columns over 'vocab', so each device
multiplies its own rows by its own columns. The context is read once, when the loss is traced:
the custom VJP's backward runs after it is closed.

Shape suffixes follow the glossary in ``models/config.py``; here also n, the rows of one
token chunk, R the number of token chunks, c the columns of one vocabulary chunk and C the
number of vocabulary chunks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import math

import jax
import jax.numpy as jnp

from models.sharding_context import current_sharding

# A finite -inf: exp() underflows to exactly 0 and 0 * (a - b) stays 0 instead of NaN.
PAD_LOGIT = -1e30


class Tile(NamedTuple):
    """One (token chunk, vocabulary chunk) tile as a reduction sees it."""

    logp_nc: jax.Array  # student log-probs; about PAD_LOGIT on padded columns
    teacher_logp_nc: jax.Array | None  # teacher log-probs, or None without a teacher
    ids_c: jax.Array  # vocabulary id of each column: ids_c[0] + stride * arange(c)
    valid_c: jax.Array  # False on padding past V
    stride: int  # C, the id step between neighbouring columns


# fn(tile, aux_n) -> tuple of [n, ...] arrays, each a sum over the tile's columns.
ReduceFn = Callable[[Tile, Any], tuple]


def _chunking(size: int, chunk: int, align: int = 1) -> tuple[int, int]:
    """(per-chunk size, number of chunks) with the chunk no larger than the array (before
    rounding up to a multiple of ``align``, which pads)."""
    chunk = min(chunk, size)
    count = -(-size // chunk)
    per = -(-size // count)
    if count == 1 and size % align == 0:
        return per, count
    return -(-per // align) * align, count


class _Layout(NamedTuple):
    """How the chunked operands are laid out on the active mesh (none: one device)."""

    constrain: Callable  # (x, logical axes) -> x
    rows: int  # devices the 'tokens' axis spans
    cols: int  # devices the 'vocab' axis spans

    @staticmethod
    def current() -> "_Layout":
        ctx = current_sharding()
        if ctx is None or ctx.mesh is None or ctx.spec is None:
            return _Layout(lambda x, axes: x, 1, 1)

        def ways(name):
            spec = ctx.spec((name,), (ctx.mesh.size,))[0]
            names = () if spec is None else (spec,) if isinstance(spec, str) else spec
            return math.prod(ctx.mesh.shape[a] for a in names)

        return _Layout(ctx.constrain, ways("tokens"), ways("vocab"))

    def chunks(self, N: int, V: int, seq_chunk: int, vocab_chunk: int):
        """(n, R, c, C): rows a multiple of the token devices, columns of 128 and the vocab
        devices when those split them (128: the MXU's width; one device keeps the chunks the
        caller asked for, and its numerics)."""
        n, R = _chunking(N, seq_chunk, self.rows if min(seq_chunk, N) >= self.rows else 1)
        wide = self.cols > 1 and min(vocab_chunk, V) >= 128
        col_align = math.lcm(128, self.cols) if wide else self.cols
        c, C = _chunking(V, vocab_chunk, col_align)
        return n, R, c, C

    def rows_nR(self, x):
        """[n, R, ...] rows over the token devices."""
        return self.constrain(x, ("tokens",) + (None,) * (x.ndim - 1))

    def cols_cC(self, w):
        """[..., D, c, C] lm_head columns over the vocab devices, whole D on each."""
        return self.constrain(w, (None,) * (w.ndim - 2) + ("vocab", None))


def _split_rows(tree, n, R):
    """[N, ...] -> [n, R, ...]: chunk i is [:, i], rows i, i + R, ...; zero-padded to n*R."""

    def split(x):
        x = jnp.pad(x, [(0, n * R - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n, R) + x.shape[1:])

    return jax.tree.map(split, tree)


def _merge_rows(tree, N):
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:N], tree)


def _split_cols(w, c, C):
    """[..., V] -> [..., c, C]: chunk j is [..., j], ids j, j + C, ...; zero-padded to c*C."""
    w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, c * C - w.shape[-1])])
    return w.reshape(w.shape[:-1] + (c, C))


def _index(x, i, axis):
    """x's slice i along axis (dropped), 16-bit floats sliced as raw bits on CPU.

    XLA:CPU runs a bf16 dynamic-slice in fp32, converting the whole operand; inside the chunk
    loops that convert is loop-invariant, so it is hoisted into an fp32 copy of every lm_head
    and hidden-state operand (2x their size, for nothing). Slicing the uint16 bits is exact and
    keeps the copy 16-bit; other platforms slice bf16 natively and take the plain path.
    """
    def plain(x, i):
        return jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False)

    if not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2):
        return plain(x, i)

    def bits(x, i):
        u = plain(jax.lax.bitcast_convert_type(x, jnp.uint16), i)
        return jax.lax.bitcast_convert_type(u, x.dtype)

    return jax.lax.platform_dependent(x, i, cpu=bits, default=plain)


def _take(tree, i):
    """Row chunk i of [n, R, ...] arrays."""
    return jax.tree.map(lambda x: _index(x, i, 1), tree)


def _put(tree, part, i):
    return jax.tree.map(lambda x, p: jax.lax.dynamic_update_index_in_dim(x, p, i, 1), tree, part)


def _logits(h_nD, w_cC, j, V, inv_temp, which_n=None):
    """fp32 logits of column chunk j; w is [D, c, C], or [M, D, c, C] with row n using which_n[n].

    Returns (logits_nc, ids_c, valid_c, w_c) with padded columns at PAD_LOGIT.
    """
    c, C = w_cC.shape[-2:]
    w_c = _index(w_cC, j, w_cC.ndim - 1)
    ids_c = jnp.arange(c) * C + j
    valid_c = ids_c < V
    if w_c.ndim == 2:
        z_nc = jnp.dot(h_nD, w_c, preferred_element_type=jnp.float32)
    else:  # a few stacked lm_heads (one per teacher): score every row with each, keep its own
        z_Mnc = jnp.einsum("nd,mdc->mnc", h_nD, w_c, preferred_element_type=jnp.float32)
        z_nc = jnp.take_along_axis(z_Mnc, which_n[None, :, None], axis=0)[0]
    return jnp.where(valid_c, z_nc * inv_temp, PAD_LOGIT), ids_c, valid_c, w_c


def _logsumexp_rows(h_nD, w_cC, V, inv_temp, which_n=None):
    """Online (running max, rescaled sum) logsumexp over the vocabulary chunks."""

    def body(j, carry):
        m_n, s_n = carry
        l_nc = _logits(h_nD, w_cC, j, V, inv_temp, which_n)[0]
        m_new = jnp.maximum(m_n, l_nc.max(-1))
        s_n = s_n * jnp.exp(m_n - m_new) + jnp.exp(l_nc - m_new[:, None]).sum(-1)
        return m_new, s_n

    n = h_nD.shape[0]
    init = (jnp.full((n,), PAD_LOGIT, jnp.float32), jnp.zeros((n,), jnp.float32))
    m_n, s_n = jax.lax.fori_loop(0, w_cC.shape[-1], body, init)
    return m_n + jnp.log(s_n)


def vocab_reduce(
    fn: ReduceFn,
    h_ND: jax.Array,
    w_DV: jax.Array,
    aux: Any = None,
    teacher: tuple | None = None,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    vocab_chunk: int = 8192,
    seq_chunk: int = 1024,
) -> tuple[jax.Array, tuple]:
    """Per-token (student logsumexp_N, sums over the vocabulary of fn's outputs), chunked.

    Logits are `h @ w / temperature`. `aux` is a pytree of per-token arrays [N, ...] handed to fn
    chunk by chunk (ids, teacher top-k, ...). `teacher` is (h_ND, w_DV) of a model with the same
    vocabulary, or (h_ND, w_MDV, which_N) with M stacked lm_heads and row n scored by teacher
    which_N[n] (M teacher matmuls per tile, one student matmul). Gradients flow to the student's
    h_ND and w_DV only: the teacher and aux are constants (stop-gradient). fn must be additive over
    columns, so its per-chunk partial sums add up to the full-vocabulary value.
    """
    N, V = h_ND.shape[0], w_DV.shape[1]
    if h_ND.shape[1] != w_DV.shape[0]:
        raise ValueError(f"hidden dim {h_ND.shape[1]} != lm_head rows {w_DV.shape[0]}")
    if teacher is not None:
        teacher = tuple(teacher) + (None,) * (3 - len(teacher))
        if teacher[1].shape[-1] != V:
            raise ValueError(f"teacher vocab {teacher[1].shape[-1]} != student vocab {V}")
        if (teacher[1].ndim == 3) != (teacher[2] is not None):
            raise ValueError("stacked teacher lm_heads [M, D, V] need a per-row teacher index")
    layout = _Layout.current()
    n, R, c, C = layout.chunks(N, V, seq_chunk, vocab_chunk)
    inv_s, inv_t = 1.0 / temperature, 1.0 / teacher_temperature

    def tile(h_nD, w_cC, lse_n, teacher_n, j):
        l_nc, ids_c, valid_c, w_c = _logits(h_nD, w_cC, j, V, inv_s)
        t_nc = None
        if teacher_n is not None:
            th_nD, tw_cC, which_n, tlse_n = teacher_n
            t_nc = _logits(th_nD, tw_cC, j, V, inv_t, which_n)[0] - tlse_n[:, None]
        return Tile(l_nc - lse_n[:, None], t_nc, ids_c, valid_c, C), w_c

    def rows(tree):
        return jax.tree.map(layout.rows_nR, _split_rows(tree, n, R))

    def split(h_ND, w_DV, aux, teacher):
        """Strided chunk layout of every operand: rows [n, R, ...], columns [..., c, C]."""
        if teacher is not None:
            th_ND, tw, which_N = teacher
            teacher = (rows(th_ND), layout.cols_cC(_split_cols(tw, c, C)), rows(which_N))
        return rows(h_ND), layout.cols_cC(_split_cols(w_DV, c, C)), rows(aux), teacher

    def teacher_chunk(teacher, tlse_nR, i):
        if teacher is None:
            return None
        th_nD, which_n = _take((teacher[0], teacher[2]), i)
        if tlse_nR is None:
            tlse_n = _logsumexp_rows(th_nD, teacher[1], V, inv_t, which_n)
        else:
            tlse_n = _take(tlse_nR, i)
        return th_nD, teacher[1], which_n, tlse_n

    def forward(h_ND, w_DV, aux, teacher, with_dirs):
        h_nRD, w_DcC, aux_nR, teacher = split(h_ND, w_DV, aux, teacher)
        tile0 = Tile(jnp.zeros((n, c)), None if teacher is None else jnp.zeros((n, c)),
                     jnp.zeros((c,), jnp.int32), jnp.ones((c,), bool), C)
        shapes = jax.eval_shape(lambda aux_n: fn(tile0, aux_n), _take(aux_nR, 0))

        def zeros(*lead):
            return jax.tree.map(lambda s: jnp.zeros(lead + s.shape[1:]), shapes)

        init = (jnp.zeros((n, R)), jnp.zeros((n, R)), zeros(n, R), zeros(n, R) if with_dirs else ())

        def seq_body(i, acc):
            h_nD, aux_n = _take((h_nRD, aux_nR), i)
            lse_n = _logsumexp_rows(h_nD, w_DcC, V, inv_s)
            teacher_n = teacher_chunk(teacher, None, i)

            def vocab_body(j, sums):
                t = tile(h_nD, w_DcC, lse_n, teacher_n, j)[0]
                f = lambda a: fn(t._replace(logp_nc=a), aux_n)  # noqa: E731
                if with_dirs:  # sum over columns of d(out)/d(logp), needed by the backward pass
                    part = jax.jvp(f, (t.logp_nc,), (jnp.ones_like(t.logp_nc),))
                else:
                    part = (f(t.logp_nc), ())
                return jax.tree.map(jnp.add, sums, part)

            sums = jax.lax.fori_loop(0, C, vocab_body, (zeros(n), zeros(n) if with_dirs else ()))
            tlse_n = jnp.zeros((n,)) if teacher_n is None else teacher_n[3]
            return _put(acc, (lse_n, tlse_n, *sums), i)

        return _merge_rows(jax.lax.fori_loop(0, R, seq_body, init), N)

    @jax.custom_vjp
    def reduce(h_ND, w_DV, aux, teacher):
        lse_N, _, outs, _ = forward(h_ND, w_DV, aux, teacher, with_dirs=False)
        return lse_N, outs

    def reduce_fwd(h_ND, w_DV, aux, teacher):
        lse_N, tlse_N, outs, dirs = forward(h_ND, w_DV, aux, teacher, with_dirs=True)
        return (lse_N, outs), (h_ND, w_DV, aux, teacher, lse_N, tlse_N, dirs)

    def reduce_bwd(res, cts):
        h_ND, w_DV, aux, teacher, lse_N, tlse_N, dirs = res
        g_lse_N, g_outs = cts
        # logp = l - lse(l), so dL/dl_v = dfn/da_v + p_v (g_lse - sum_j g_j . dirs_j).
        gdirs = jax.tree.map(lambda g, d: (g * d).reshape(N, -1).sum(-1), g_outs, dirs)
        gp_N = g_lse_N - sum(jax.tree.leaves(gdirs), jnp.zeros((N,)))
        h_nRD, w_DcC, aux_nR, teacher = split(h_ND, w_DV, aux, teacher)
        # Padded rows get zero cotangents, so they add nothing to dw.
        lse_nR, tlse_nR, gp_nR, g_nR = rows((lse_N, tlse_N, gp_N, g_outs))

        # Vocabulary chunks outside, token chunks inside: each dw column chunk is summed in fp32
        # over the token chunks and stored once in lm_head's dtype, so the only fp32 accumulator
        # spanning the loops is dh [N, D], not dw [D, V]. Same sums in the same order as a
        # token-outer loop, so the gradients are bit-identical to it.
        def vocab_body(j, carry):
            dh_nRD, dw_DcC = carry

            def seq_body(i, carry):
                dh_nRD, dw_Dc = carry
                h_nD, aux_n, lse_n, gp_n, g_n = _take((h_nRD, aux_nR, lse_nR, gp_nR, g_nR), i)
                t, w_Dc = tile(h_nD, w_DcC, lse_n, teacher_chunk(teacher, tlse_nR, i), j)
                _, vjp = jax.vjp(lambda a: fn(t._replace(logp_nc=a), aux_n), t.logp_nc)
                dl_nc = vjp(g_n)[0] + jnp.exp(t.logp_nc) * gp_n[:, None]
                dz_nc = jnp.where(t.valid_c, dl_nc, 0.0) * inv_s
                dh_nD = _take(dh_nRD, i) + jnp.dot(dz_nc, w_Dc.T,
                                                   preferred_element_type=jnp.float32)
                dw_Dc = dw_Dc + jnp.dot(h_nD.T, dz_nc, preferred_element_type=jnp.float32)
                return _put(dh_nRD, dh_nD, i), dw_Dc

            dw_Dc = jnp.zeros(w_DcC.shape[:-1], jnp.float32)
            dh_nRD, dw_Dc = jax.lax.fori_loop(0, R, seq_body, (dh_nRD, dw_Dc))
            dw_Dc = dw_Dc.astype(w_DcC.dtype)
            return dh_nRD, jax.lax.dynamic_update_index_in_dim(dw_DcC, dw_Dc, j, 2)

        init = (layout.rows_nR(jnp.zeros(h_nRD.shape, jnp.float32)),
                layout.cols_cC(jnp.zeros(w_DcC.shape, w_DcC.dtype)))
        dh_nRD, dw_DcC = jax.lax.fori_loop(0, C, vocab_body, init)
        dh_ND = _merge_rows(dh_nRD, N)
        dw_DV = dw_DcC.reshape(w_DcC.shape[0], -1)[:, :V]
        return dh_ND.astype(h_ND.dtype), dw_DV, None, None

    reduce.defvjp(reduce_fwd, reduce_bwd)
    return reduce(h_ND, w_DV, jax.lax.stop_gradient(aux), jax.lax.stop_gradient(teacher))


# Column terms: each maps a tile to per-token partial sums over its columns (a ReduceFn body).


def gather_term(t: Tile, ids_nk: jax.Array, logp_nc: jax.Array | None = None):
    """(log-probs at ids_nk, hit mask); zero where the id lives in another chunk."""
    logp_nc = t.logp_nc if logp_nc is None else logp_nc
    offset_nk = ids_nk - t.ids_c[0]
    local_nk = jnp.clip(offset_nk // t.stride, 0, t.ids_c.shape[0] - 1)
    hit_nk = (offset_nk >= 0) & (local_nk * t.stride == offset_nk) & t.valid_c[local_nk]
    return jnp.where(hit_nk, jnp.take_along_axis(logp_nc, local_nk, axis=1), 0.0), hit_nk


def entropy_term(t: Tile) -> jax.Array:
    """-sum_v p_s log p_s over the tile."""
    return -jnp.where(t.valid_c, jnp.exp(t.logp_nc) * t.logp_nc, 0.0).sum(-1)


def reverse_kl_term(t: Tile) -> jax.Array:
    """sum_v p_s (log p_s - log p_t) over the tile."""
    a, b = t.logp_nc, t.teacher_logp_nc
    return jnp.where(t.valid_c, jnp.exp(a) * (a - b), 0.0).sum(-1)


def forward_kl_term(t: Tile) -> jax.Array:
    """sum_v p_t (log p_t - log p_s) over the tile."""
    a, b = t.logp_nc, t.teacher_logp_nc
    return jnp.where(t.valid_c, jnp.exp(b) * (b - a), 0.0).sum(-1)


def jsd_term(t: Tile, beta: float) -> jax.Array:
    """Generalised JSD(beta) of GKD over the tile; beta=0 forward KL, beta=1 reverse KL.

    M = beta p_t + (1 - beta) p_s and JSD = beta KL(p_t||M) + (1 - beta) KL(p_s||M), as in the GKD
    paper (P = teacher) and TRL. That expression vanishes at both ends, so the ends are defined as
    the divergences it approaches in shape: beta=0 is KL(p_t||p_s), beta=1 is KL(p_s||p_t).
    """
    if beta == 0.0:
        return forward_kl_term(t)
    if beta == 1.0:
        return reverse_kl_term(t)
    a, b = t.logp_nc, t.teacher_logp_nc
    m = jnp.logaddexp(b + jnp.log(beta), a + jnp.log1p(-beta))
    kl_t = jnp.exp(b) * (b - m)
    kl_s = jnp.exp(a) * (a - m)
    return jnp.where(t.valid_c, beta * kl_t + (1.0 - beta) * kl_s, 0.0).sum(-1)


def topk_kl_term(t: Tile, ids_nk: jax.Array, teacher_logp_nk: jax.Array) -> jax.Array:
    """sum_{v in teacher top-k} p_s (log p_s - log p_t) - p_s + p_t, NOT renormalised."""
    a_nk, hit_nk = gather_term(t, ids_nk)
    p_nk, q_nk = jnp.exp(a_nk), jnp.exp(teacher_logp_nk)
    return jnp.where(hit_nk, p_nk * (a_nk - teacher_logp_nk) - p_nk + q_nk, 0.0).sum(-1)


# Public primitives on [B, T, D] hidden states.


def _flat(x):
    return x.reshape((-1,) + x.shape[2:])


def chunked_logsumexp(h_ND, w_DV, vocab_chunk=8192, *, seq_chunk=1024, temperature=1.0):
    """logsumexp_v (h @ w / temperature) per row, never materialising [N, V]."""
    return vocab_reduce(lambda t, aux: (), h_ND, w_DV, temperature=temperature,
                        vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)[0]


def chunked_gather_logprobs(h_BTD, w_DV, ids_BTk, *, temperature=1.0, vocab_chunk=8192,
                            seq_chunk=1024):
    """log softmax(h @ w / temperature) at ids_BTk; differentiable w.r.t. h and w."""
    B, T, k = ids_BTk.shape
    fn = lambda t, ids_nk: (gather_term(t, ids_nk)[0],)  # noqa: E731
    (logp_Nk,) = vocab_reduce(fn, _flat(h_BTD), w_DV, _flat(ids_BTk), temperature=temperature,
                              vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)[1]
    return logp_Nk.reshape(B, T, k)


def chunked_token_logprobs(h_BTD, w_DV, tokens_BT, *, temperature=1.0, vocab_chunk=8192,
                           seq_chunk=1024):
    """log softmax(h @ w / temperature) at the given token, [B, T]."""
    return chunked_gather_logprobs(h_BTD, w_DV, tokens_BT[..., None], temperature=temperature,
                                   vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)[..., 0]


def chunked_entropy(h_BTD, w_DV, *, temperature=1.0, vocab_chunk=8192, seq_chunk=1024):
    """Entropy of softmax(h @ w / temperature) per token, [B, T]."""
    B, T, _ = h_BTD.shape
    (ent_N,) = vocab_reduce(lambda t, aux: (entropy_term(t),), _flat(h_BTD), w_DV,
                            temperature=temperature, vocab_chunk=vocab_chunk,
                            seq_chunk=seq_chunk)[1]
    return ent_N.reshape(B, T)


def teacher_operand(teacher_h_BTD, teacher_w, teacher_index_B=None):
    """`vocab_reduce`'s teacher tuple; teacher_w [M, D, V] is routed per sequence by index_B."""
    if teacher_index_B is None:
        return _flat(teacher_h_BTD), teacher_w
    B, T, _ = teacher_h_BTD.shape
    which_N = jnp.broadcast_to(teacher_index_B[:, None], (B, T)).reshape(-1)
    return _flat(teacher_h_BTD), teacher_w, which_N


def _pair_reduce(term, h_BTD, w_DV, teacher_h_BTD, teacher_w, teacher_index_B, temperature,
                 teacher_temperature, vocab_chunk, seq_chunk):
    B, T, _ = h_BTD.shape
    teacher = teacher_operand(teacher_h_BTD, teacher_w, teacher_index_B)
    (out_N,) = vocab_reduce(lambda t, aux: (term(t),), _flat(h_BTD), w_DV,
                            teacher=teacher, temperature=temperature,
                            teacher_temperature=teacher_temperature, vocab_chunk=vocab_chunk,
                            seq_chunk=seq_chunk)[1]
    return out_N.reshape(B, T)


def chunked_reverse_kl(h_BTD, w_DV, teacher_h_BTD, teacher_w, *, teacher_index_B=None,
                       temperature=1.0, teacher_temperature=1.0, vocab_chunk=8192,
                       seq_chunk=1024):
    """Exact KL(student || teacher) per token, [B, T]; the teacher is stop-gradient."""
    return _pair_reduce(reverse_kl_term, h_BTD, w_DV, teacher_h_BTD, teacher_w, teacher_index_B,
                        temperature, teacher_temperature, vocab_chunk, seq_chunk)


def chunked_forward_kl(h_BTD, w_DV, teacher_h_BTD, teacher_w, *, teacher_index_B=None,
                       temperature=1.0, teacher_temperature=1.0, vocab_chunk=8192,
                       seq_chunk=1024):
    """Exact KL(teacher || student) per token, [B, T]; the teacher is stop-gradient."""
    return _pair_reduce(forward_kl_term, h_BTD, w_DV, teacher_h_BTD, teacher_w, teacher_index_B,
                        temperature, teacher_temperature, vocab_chunk, seq_chunk)


def chunked_jsd(h_BTD, w_DV, teacher_h_BTD, teacher_w, beta, *, teacher_index_B=None,
                temperature=1.0, teacher_temperature=1.0, vocab_chunk=8192, seq_chunk=1024):
    """Generalised JSD(beta) per token (see `jsd_term` for the convention), [B, T]."""
    return _pair_reduce(lambda t: jsd_term(t, beta), h_BTD, w_DV, teacher_h_BTD, teacher_w,
                        teacher_index_B, temperature, teacher_temperature, vocab_chunk,
                        seq_chunk)


def chunked_topk_kl(h_BTD, w_DV, ids_BTk, teacher_logp_BTk, *, temperature=1.0,
                    vocab_chunk=8192, seq_chunk=1024):
    """Estimator-B term per token: `topk_kl_term` at the teacher's top-k ids, [B, T]."""
    B, T, _ = h_BTD.shape
    fn = lambda t, aux: (topk_kl_term(t, *aux),)  # noqa: E731
    (out_N,) = vocab_reduce(fn, _flat(h_BTD), w_DV, (_flat(ids_BTk), _flat(teacher_logp_BTk)),
                            temperature=temperature, vocab_chunk=vocab_chunk,
                            seq_chunk=seq_chunk)[1]
    return out_N.reshape(B, T)


def chunked_topk(h_BTD, w_DV, k, *, temperature=1.0, vocab_chunk=8192, seq_chunk=1024):
    """(ids_BTk, logprobs_BTk) of the k most likely tokens, a running top-k over vocab chunks.

    Scoring-side (teacher) primitive: the outputs are not differentiated; use
    `chunked_gather_logprobs` for differentiable log-probs at given ids.
    """
    B, T, _ = h_BTD.shape
    V = w_DV.shape[1]
    if not 0 < k <= V:
        raise ValueError(f"top-k k={k} must be in [1, vocab={V}]")
    h_ND, w_DV = jax.lax.stop_gradient((_flat(h_BTD), w_DV))
    N = h_ND.shape[0]
    layout = _Layout.current()
    n, R, c, C = layout.chunks(N, V, seq_chunk, vocab_chunk)
    h_nRD = layout.rows_nR(_split_rows(h_ND, n, R))
    w_DcC = layout.cols_cC(_split_cols(w_DV, c, C))
    inv = 1.0 / temperature

    def seq_body(i, acc):
        h_nD = _take(h_nRD, i)

        def vocab_body(j, carry):
            m_n, s_n, vals_nk, ids_nk = carry
            l_nc, ids_c, _, _ = _logits(h_nD, w_DcC, j, V, inv)
            m_new = jnp.maximum(m_n, l_nc.max(-1))
            s_n = s_n * jnp.exp(m_n - m_new) + jnp.exp(l_nc - m_new[:, None]).sum(-1)
            top_vals, top_idx = jax.lax.top_k(l_nc, min(k, c))
            vals_nk, pick = jax.lax.top_k(jnp.concatenate([vals_nk, top_vals], 1), k)
            ids_nk = jnp.take_along_axis(jnp.concatenate([ids_nk, ids_c[top_idx]], 1), pick, 1)
            return m_new, s_n, vals_nk, ids_nk

        init = (jnp.full((n,), PAD_LOGIT), jnp.zeros((n,)), jnp.full((n, k), -jnp.inf),
                jnp.zeros((n, k), jnp.int32))
        m_n, s_n, vals_nk, ids_nk = jax.lax.fori_loop(0, C, vocab_body, init)
        return _put(acc, (ids_nk, vals_nk - (m_n + jnp.log(s_n))[:, None]), i)

    init = (jnp.zeros((n, R, k), jnp.int32), jnp.zeros((n, R, k), jnp.float32))
    ids_Nk, logp_Nk = _merge_rows(jax.lax.fori_loop(0, R, seq_body, init), N)
    return ids_Nk.reshape(B, T, k), logp_Nk.reshape(B, T, k)
