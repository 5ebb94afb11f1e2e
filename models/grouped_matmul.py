"""Grouped matmul: ``y[rows of group g] = x[rows of group g] @ w[g]`` for rows sorted by group.

``gmm(x_MK, w_GKN, group_sizes_G, impl)`` is what the MoE's expert matmuls call; rows past
``sum(group_sizes)`` come out zero in every implementation. Three implementations:

* ``megablox`` (TPU): the JAX-shipped Pallas kernel, a ``custom_vjp`` whose input gradient is
  ``gmm`` again and whose weight gradient is ``tgmm``: two Mosaic custom calls, no dense work
  over the experts. ``interpret=True`` runs it on CPU (tests only: slow).
* ``ragged`` (GPU): ``lax.ragged_dot`` forward and input gradient; the weight gradient is the
  blocked one below, not ``ragged_dot``'s own transpose (a ragged-contracting dot that XLA
  turns into dense work over every group on TPU, and that XLA:GPU pads for many shapes).
* ``blocked`` (CPU): each group's first ``capacity`` rows (about the mean group size plus 2.5
  standard deviations of a balanced router's) gathered into a padded ``[G, C, K]`` layout and
  run as one ``[C, K] @ [K, N]`` matmul per group in a ``scan`` (each expert's weights read
  once per pass), and the rows past a group's capacity (rare at a balanced load; all rows when
  groups average under 2, as in decode) in a ``fori_loop`` over ``block_rows``-row blocks that
  runs only the blocks there are (a block past its group's end is masked). Its ``custom_vjp``
  does the same for dx and computes dw as one batched matmul over the padded layout plus the
  overflow blocks. XLA:CPU lowers ``ragged_dot`` to a masked dense product over all groups
  (≈ G× the FLOPs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from models.sharding_context import current_sharding

IMPLS = ("megablox", "ragged", "blocked")


def gmm(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, impl: str, *,
        block_rows: int | None = None, capacity: int | None = None) -> jax.Array:
    """Grouped matmul of rows sorted by group (``impl`` in ``IMPLS``); out dtype = x's.

    ``blocked`` (and ``ragged``'s weight gradient): ``capacity`` rows per group go through one
    batched matmul (None: from the mean group size; 0: none), the rest in blocks of
    ``block_rows`` (None: about the mean group size; given alone, it is the capacity too).
    """
    gs = group_sizes_G.astype(jnp.int32)
    M, G = x_MK.shape[0], w_GKN.shape[0]
    bm = _block(block_rows, M, G)
    C = _capacity(capacity if capacity is not None else block_rows, M, G)
    if impl == "megablox":
        return _megablox(x_MK, w_GKN, gs)
    if impl == "ragged":
        return _ragged(x_MK, w_GKN, gs, C, bm)
    if impl == "blocked":
        return _blocked(x_MK, w_GKN, gs, C, bm)
    raise ValueError(f"grouped matmul: unknown impl {impl!r}; choose one of {list(IMPLS)}")


def _block(block_rows: int | None, M: int, G: int) -> int:
    """Rows per block of the loop: about the mean rows per group (padding per group < one
    block), a power of two in [8, 256] (fewer, larger blocks run at a higher matmul rate on
    CPU)."""
    if block_rows:
        return block_rows
    mean = max(M // max(G, 1), 1)
    return int(min(256, max(8, 2 ** math.ceil(math.log2(mean)))))


def _row_mask(y_MN, group_sizes_G):
    rows = jnp.arange(y_MN.shape[0])[:, None]
    return jnp.where(rows < jnp.sum(group_sizes_G), y_MN, jnp.zeros((), y_MN.dtype))


# ----------------------------------------------------------------------------- megablox
def _megablox(x_MK, w_GKN, gs):
    M, K = x_MK.shape
    N = w_GKN.shape[2]
    tm = min(128, _round_up(M, 8))
    Mp = _round_up(M, tm)
    xp = jnp.pad(x_MK, ((0, Mp - M), (0, 0))) if Mp != M else x_MK
    tiling = (tm, *(_kn_tile(K, N),) * 2)
    interpret = jax.default_backend() != "tpu" and not _tracing_for_tpu()
    return _megablox_gmm(xp, w_GKN, gs, tiling, interpret)[:M]


def _kn_tile(K: int, N: int) -> int:
    """One k/n tile for the forward and both gradients (which swap K and N): a multiple of 128
    (Mosaic's lane width) dividing both where one does; the kernel masks ragged edges."""
    for t in (512, 256, 128):
        if K % t == 0 and N % t == 0:
            return t
    return 128 if min(K, N) >= 128 else min(K, N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _megablox_gmm(x_MK, w_GKN, gs, tiling, interpret):
    mb = _megablox_module()
    with _kernel_precision(x_MK.dtype):
        y = mb.gmm(x_MK, w_GKN, gs, x_MK.dtype, tiling, interpret=interpret)
    return _row_mask(y, gs)  # tiles past the last group are never written by the kernel


def _megablox_fwd(x_MK, w_GKN, gs, tiling, interpret):
    return _megablox_gmm(x_MK, w_GKN, gs, tiling, interpret), (x_MK, w_GKN, gs)


def _megablox_bwd(tiling, interpret, res, dy_MN):
    mb = _megablox_module()
    x_MK, w_GKN, gs = res
    with _kernel_precision(x_MK.dtype):
        dx = mb.gmm(dy_MN, w_GKN, gs, x_MK.dtype, tiling, transpose_rhs=True,
                    interpret=interpret)
        dw = mb.tgmm(x_MK.swapaxes(0, 1), dy_MN, gs, w_GKN.dtype, tiling, None,
                     w_GKN.shape[0], interpret=interpret)
    return _row_mask(dx, gs), dw, None


_megablox_gmm.defvjp(_megablox_fwd, _megablox_bwd)


def _kernel_precision(dtype):
    """bf16 operands at the default matmul precision: Mosaic refuses a bf16 dot asked for
    'highest' (a global ``jax_default_matmul_precision``), which bf16 inputs gain nothing from."""
    import contextlib
    return (jax.default_matmul_precision("default") if dtype == jnp.bfloat16
            else contextlib.nullcontext())


def _megablox_module():
    """The kernel module (the package's ``gmm`` attribute is the custom_vjp function)."""
    import importlib
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _tracing_for_tpu() -> bool:
    """True when the active mesh is TPU devices (libtpu compile-only devices included)."""
    ctx = current_sharding()
    mesh = getattr(ctx, "mesh", None)
    return mesh is not None and mesh.devices.flat[0].platform == "tpu"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------- blocked
def _capacity(capacity: int | None, M: int, G: int) -> int:
    """Rows per group in the padded batched matmul: the mean plus 2.5 standard deviations of a
    balanced router's (Poisson) group sizes, rounded up to 8, so a group rarely overflows; 0
    (every row through the block loop) when groups average under 2 rows (decode), where a
    batched matmul would stream every expert's weights for a few rows."""
    if capacity is not None:
        return capacity
    mean = M / max(G, 1)
    if mean < 2:
        return 0
    return _round_up(math.ceil(mean + 2.5 * math.sqrt(mean)), 8)


def _group_bounds(gs):
    ends = jnp.cumsum(gs)
    return ends - gs, ends


def _to_padded(x_MK, gs, C: int):
    """[G, C, K]: row c of group g is the group's c-th row (zero past its size)."""
    starts, _ = _group_bounds(gs)
    c = jnp.arange(C)
    idx_GC = jnp.clip(starts[:, None] + c, 0, x_MK.shape[0] - 1)
    return jnp.where((c < gs[:, None])[..., None], x_MK[idx_GC], jnp.zeros((), x_MK.dtype))


def _from_padded(y_GCN, gs, M: int):
    """[M, N]: each row's entry of the padded layout; zero for rows past the last group and
    for rows past their group's capacity (the overflow loop fills those)."""
    G, C, N = y_GCN.shape
    starts, ends = _group_bounds(gs)
    rows = jnp.arange(M)
    g_M = jnp.minimum(jnp.searchsorted(ends, rows, side="right", method="compare_all"),
                      G - 1)
    c_M = rows - starts[g_M]
    ok_M = (rows < ends[-1]) & (c_M < C)
    y = y_GCN.reshape(G * C, N)[g_M * C + jnp.clip(c_M, 0, C - 1)]
    return jnp.where(ok_M[:, None], y, jnp.zeros((), y.dtype))


def _blocks(gs, M: int, bm: int, skip: int):
    """Per-block (group, first row, end of its group) for the blocks of each group's rows past
    its first ``skip``, and their count; arrays sized for the most blocks ``M`` rows in ``G``
    groups can need."""
    G = gs.shape[0]
    starts, ends = _group_bounds(gs)
    rest = jnp.maximum(gs - skip, 0)
    nblk = (rest + bm - 1) // bm
    cum = jnp.cumsum(nblk)
    nb_max = -(-M // bm) + min(G, M)
    b = jnp.arange(nb_max)
    g = jnp.minimum(jnp.searchsorted(cum, b, side="right"), G - 1).astype(jnp.int32)
    row0 = starts[g] + skip + (b - (cum[g] - nblk[g])) * bm
    return g, row0.astype(jnp.int32), ends[g].astype(jnp.int32), cum[-1]


def _loop_blocks(M: int, bm: int, gs, skip: int, body, init):
    """``fori_loop`` over the blocks there are (rows of each group past its first ``skip``);
    ``body(g, r0, rows_valid_b1, carry)`` gets the (clamped) first row ``r0`` of a ``bm``-row
    window and which of its rows are its own."""
    g_b, row0_b, end_b, count = _blocks(gs, M, bm, skip)

    def step(i, carry):
        g, row0, end = g_b[i], row0_b[i], end_b[i]
        r0 = jnp.minimum(row0, M - bm)  # a window past the end slides back, masked
        rows = r0 + jnp.arange(bm)
        return body(g, r0, ((rows >= row0) & (rows < end))[:, None], carry)

    return jax.lax.fori_loop(0, count, step, init)


def _pad_rows(x, bm):
    return jnp.pad(x, ((0, bm - x.shape[0]), (0, 0))) if x.shape[0] < bm else x


def _blocked_fwd_impl(x_MK, w_GKN, gs, C: int, bm: int, transpose_w=False):
    """Rows in each group's first ``C``: one ``[C, K] @ [K, N]`` matmul per group over the
    padded [G, C, K] layout (each expert's weights read once); the rows past a group's
    capacity (rare at a balanced load) in a loop over ``bm``-row blocks."""
    M = x_MK.shape[0]
    N = w_GKN.shape[1] if transpose_w else w_GKN.shape[2]
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    if C:  # a scan over the groups: XLA:CPU runs a batched dot_general of these far slower
        def group(_, xw):
            x_CK, w_KN = xw
            if transpose_w:  # w @ x^T: XLA:CPU's matmul with a transposed rhs is slower
                y = jax.lax.dot_general(w_KN, x_CK, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32).T
            else:
                y = jax.lax.dot_general(x_CK, w_KN, dims, preferred_element_type=jnp.float32)
            return None, y.astype(x_MK.dtype)

        _, y_GCN = jax.lax.scan(group, None, (_to_padded(x_MK, gs, C), w_GKN))
        y = _from_padded(y_GCN, gs, M)
    else:
        y = jnp.zeros((M, N), x_MK.dtype)
    x, y = _pad_rows(x_MK, bm), _pad_rows(y, bm)

    def body(g, r0, valid, y):
        xb = jax.lax.dynamic_slice_in_dim(x, r0, bm)
        wg = jax.lax.dynamic_index_in_dim(w_GKN, g, keepdims=False)
        yb = jax.lax.dot_general(xb, wg, dims, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(y, r0, bm)
        return jax.lax.dynamic_update_slice_in_dim(
            y, jnp.where(valid, yb.astype(y.dtype), old), r0, 0)

    return _loop_blocks(x.shape[0], bm, gs, C, body, y)[:M]


def _tgmm_blocked(x_MK, dy_MN, gs, G: int, C: int, bm: int, dtype):
    """dw[g] = x[rows of g]^T @ dy[rows of g]: one batched matmul over the padded layout, then
    the overflow rows' blocks added, accumulated in float32."""
    K, N = x_MK.shape[1], dy_MN.shape[1]
    if C:
        dw = jax.lax.dot_general(_to_padded(x_MK, gs, C), _to_padded(dy_MN, gs, C),
                                 (((1,), (1,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32)
    else:
        dw = jnp.zeros((G, K, N), jnp.float32)
    x, dy = _pad_rows(x_MK, bm), _pad_rows(dy_MN, bm)

    def body(g, r0, valid, dw):
        xb = jax.lax.dynamic_slice_in_dim(x, r0, bm)
        db = jnp.where(valid, jax.lax.dynamic_slice_in_dim(dy, r0, bm), 0)
        part = jax.lax.dot_general(xb, db, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_index_in_dim(dw, g, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(dw, cur + part[None], g, 0)

    return _loop_blocks(x.shape[0], bm, gs, C, body, dw).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked(x_MK, w_GKN, gs, C, bm):
    return _blocked_fwd_impl(x_MK, w_GKN, gs, C, bm)


def _blocked_fwd(x_MK, w_GKN, gs, C, bm):
    return _blocked_fwd_impl(x_MK, w_GKN, gs, C, bm), (x_MK, w_GKN, gs)


def _blocked_bwd(C, bm, res, dy_MN):
    x_MK, w_GKN, gs = res
    dx = _blocked_fwd_impl(dy_MN, w_GKN, gs, C, bm, transpose_w=True)
    dw = _tgmm_blocked(x_MK, dy_MN, gs, w_GKN.shape[0], C, bm, w_GKN.dtype)
    return dx.astype(x_MK.dtype), dw, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ----------------------------------------------------------------------------- ragged
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged(x_MK, w_GKN, gs, C, bm):
    return jax.lax.ragged_dot(x_MK, w_GKN, gs)


def _ragged_fwd(x_MK, w_GKN, gs, C, bm):
    return jax.lax.ragged_dot(x_MK, w_GKN, gs), (x_MK, w_GKN, gs)


def _ragged_bwd(C, bm, res, dy_MN):
    x_MK, w_GKN, gs = res
    dx = jax.lax.ragged_dot(dy_MN, jnp.swapaxes(w_GKN, 1, 2), gs)
    dw = _tgmm_blocked(x_MK, dy_MN, gs, w_GKN.shape[0], C, bm, w_GKN.dtype)
    return _row_mask(dx, gs).astype(x_MK.dtype), dw, None


_ragged.defvjp(_ragged_fwd, _ragged_bwd)
