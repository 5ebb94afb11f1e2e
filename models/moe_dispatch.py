"""Per-device MoE dispatch: sort this device's (token, expert) pairs by expert, send each
expert's rows to the device that holds it, run the SwiGLU experts as grouped matmuls, send the
rows back, unsort and combine. Runs as is without a mesh, or as the body of a ``shard_map``.

Nothing here sorts more than one device's pairs: the exchange with the expert shards is a
``ragged_all_to_all`` (an ``all_to_all`` of padded chunks where XLA:CPU has no ragged one),
and the received rows are regrouped by local expert through index arithmetic, not a sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.grouped_matmul import gmm


def dispatch(x_nD, weights_nk, ids_nk, w_gate_EDF, w_up_EDF, w_down_EFD, *, impl: str,
             num_experts: int, ep_axis=None, ep_size: int = 1, ragged_a2a: bool = True):
    """sum_k weights[n, k] * SwiGLU_{ids[n, k]}(x[n]) for this device's tokens.

    Expert weights are this device's shard: ``num_experts / ep_size`` experts (all of them
    without expert parallelism), any slice of F (a tensor-parallel caller sums the partial
    outputs). ``ep_axis``: the mesh axis the experts are split over (inside ``shard_map``).
    """
    n, k = ids_nk.shape
    D = x_nD.shape[1]
    flat = ids_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)                  # this device's n*k pairs only
    x_sorted = x_nD[order // k]
    gs_E = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    if ep_size > 1:
        plan = _plan(gs_E, ep_axis, ep_size, n * k)
        x_local = _to_experts(x_sorted, plan, ep_axis, ragged_a2a)
        y_local = _swiglu(x_local, w_gate_EDF, w_up_EDF, w_down_EFD, plan["gs_local"], impl)
        y_sorted = _from_experts(y_local, plan, ep_axis, ragged_a2a, n * k)
    else:
        y_sorted = _swiglu(x_sorted, w_gate_EDF, w_up_EDF, w_down_EFD, gs_E, impl)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y_nkD = y_sorted[inverse].reshape(n, k, D)
    return jnp.einsum("nkd,nk->nd", y_nkD, weights_nk.astype(y_nkD.dtype))


def _swiglu(x_MD, w_gate_EDF, w_up_EDF, w_down_EFD, gs, impl):
    g = gmm(x_MD, w_gate_EDF, gs, impl)
    u = gmm(x_MD, w_up_EDF, gs, impl)
    return gmm(jax.nn.silu(g) * u, w_down_EFD, gs, impl)


# ----------------------------------------------------------------------------- exchange
def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def _plan(gs_E, axis, ep: int, rows: int) -> dict:
    """Offsets and sizes of the exchange; ``gs_local``: rows per local expert received.

    The receive buffer holds every row that could arrive (``ep * rows``): the rows of one
    expert shard are not bounded by anything smaller without dropping tokens.
    """
    E = gs_E.shape[0]
    L = E // ep
    send_S = gs_E.reshape(ep, L).sum(1)                     # rows for each expert shard
    recv_S = jax.lax.all_to_all(send_S, axis, 0, 0, tiled=True)
    in_off_S, recv_off_S = _exclusive_cumsum(send_S), _exclusive_cumsum(recv_S)
    out_off_S = jax.lax.all_to_all(recv_off_S, axis, 0, 0, tiled=True)
    me = jax.lax.axis_index(axis)
    gs_SE = jax.lax.all_gather(gs_E, axis)                  # every shard's rows per expert
    recv_SL = jax.lax.dynamic_slice_in_dim(gs_SE, me * L, L, axis=1)
    # received rows are ordered (source, local expert, j); the experts want (expert, source, j)
    src_SL = recv_off_S[:, None] + _exclusive_cumsum(recv_SL, axis=1)
    gs_local = recv_SL.sum(0)
    dst_LS = _exclusive_cumsum(gs_local)[:, None] + _exclusive_cumsum(recv_SL.T, axis=1)
    cap = ep * rows
    p = jnp.arange(cap, dtype=jnp.int32)
    dst_start = dst_LS.reshape(-1)                          # increasing in (expert, source)
    seg = jnp.clip(jnp.searchsorted(dst_start + recv_SL.T.reshape(-1), p, side="right"),
                   0, ep * L - 1)
    gather = src_SL.T.reshape(-1)[seg] + (p - dst_start[seg])
    valid = p < gs_local.sum()
    return {"send": send_S, "recv": recv_S, "in_off": in_off_S, "recv_off": recv_off_S,
            "out_off": out_off_S, "gs_local": gs_local.astype(jnp.int32),
            "gather": jnp.where(valid, gather, 0), "valid": valid, "cap": cap}


def _to_experts(x_sorted, plan, axis, ragged_a2a: bool):
    buf = jnp.zeros((plan["cap"], x_sorted.shape[1]), x_sorted.dtype)
    buf = _all_to_all(x_sorted, buf, plan["in_off"], plan["send"], plan["out_off"],
                      plan["recv"], axis, ragged_a2a)
    return jnp.where(plan["valid"][:, None], buf[plan["gather"]], 0)


def _from_experts(y_local, plan, axis, ragged_a2a: bool, rows: int):
    drop = jnp.where(plan["valid"], plan["gather"], plan["cap"])
    buf = jnp.zeros_like(y_local).at[drop].set(y_local, mode="drop")
    back_off = jax.lax.all_to_all(plan["in_off"], axis, 0, 0, tiled=True)
    out = jnp.zeros((rows, y_local.shape[1]), y_local.dtype)
    return _all_to_all(buf, out, plan["recv_off"], plan["recv"], back_off, plan["send"], axis,
                       ragged_a2a)


def _all_to_all(operand, output, in_off, send, out_off, recv, axis, ragged: bool):
    """``lax.ragged_all_to_all``, or the same through a padded ``all_to_all`` (XLA:CPU)."""
    cast = lambda a: a.astype(jnp.int32)  # noqa: E731
    if ragged:
        return jax.lax.ragged_all_to_all(operand, output, cast(in_off), cast(send),
                                         cast(out_off), cast(recv), axis_name=axis)
    ep, C = send.shape[0], operand.shape[0]
    j = jnp.arange(C)
    idx_SC = in_off[:, None] + j
    chunks = jnp.where((j < send[:, None])[..., None],
                       operand[jnp.clip(idx_SC, 0, C - 1)], 0)           # [ep, C, D]
    got = jax.lax.all_to_all(chunks, axis, 0, 0, tiled=False)          # got[s]: from s
    at_S = jax.lax.all_to_all(out_off, axis, 0, 0, tiled=True)         # where s's rows go
    dst = jnp.where(j < recv[:, None], at_S[:, None] + j, output.shape[0])
    return output.at[dst.reshape(-1)].set(got.reshape(ep * C, -1), mode="drop")
