"""Mixture-of-experts block: router (softmax top-k, or DeepSeek-V3 grouped sigmoid), dropless
sort-based dispatch per device.

Routing decisions are visible to callers: ``models.forward_with_routing`` has each block sow
its [B, T, k] expert ids (``nnx.Intermediate('expert_ids')``), and a call given
``expert_ids`` uses them instead of choosing (router replay), with the gate weights
recomputed from the current router at those experts so the router still learns.

``moe_impl`` picks how the experts run; all compute the same function:
  * ``megablox`` / ``ragged`` / ``blocked``: each device sorts its own (token, expert) pairs by
    expert, sends them to the devices of the mesh's expert axis that hold those experts, and
    runs each expert's SwiGLU as grouped matmuls (``models.grouped_matmul``: the Pallas
    megablox kernels on TPU, ``lax.ragged_dot`` on GPU, a blocked loop on CPU); no capacity,
    no dropped tokens (``models.moe_dispatch``). Under a mesh (``current_sharding()``) that is
    the body of a ``shard_map``: expert weights gathered over FSDP, split over 'expert' and
    over F ('tensor', partial sums added up).
  * ``auto`` (default): megablox on TPU, ragged on GPU, blocked on CPU.
  * ``dense``: every expert on every token, weighted by the (mostly zero) combine matrix; the
    reference the others are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.layers import param
from models.sharding_context import current_sharding
from models.moe_dispatch import dispatch


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.record_routing = False
        self.router = param(rngs, (D, E), ("embed", None), cfg)
        if cfg.router == "sigmoid":  # chooses experts, never weights them; no gradient flows
            self.router_bias = param(None, (E,), (None,), cfg, init="zeros")
        self.gate_proj = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg, fan_in=D)
        self.up_proj = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg, fan_in=D)
        self.down_proj = param(rngs, (E, F, D), ("expert", "mlp", "embed"), cfg, fan_in=F)

    def route(self, x_ND, ids_Nk=None):
        """Router probabilities (fp32, for the aux loss), the top-k weights and expert ids.

        ``ids_Nk`` given: those experts (router replay), weighted by the current router.
        """
        cfg = self.cfg
        if cfg.router == "sigmoid":  # Hugging Face computes this router in fp32 throughout
            logits_NE = x_ND.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
            scores_NE = jax.nn.sigmoid(logits_NE)
            probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
            if ids_Nk is None:
                ids_Nk = self._grouped_top_k(
                    scores_NE + self.router_bias[...].astype(jnp.float32))
        else:
            logits_NE = jnp.einsum("nd,de->ne", x_ND, self.router[...].astype(x_ND.dtype),
                                   preferred_element_type=jnp.float32)
            scores_NE = probs_NE = jax.nn.softmax(logits_NE, axis=-1)
            if ids_Nk is None:
                _, ids_Nk = jax.lax.top_k(probs_NE, cfg.num_experts_per_tok)
        weights_Nk = jnp.take_along_axis(scores_NE, ids_Nk, axis=-1)
        if cfg.norm_topk_prob:
            weights_Nk = weights_Nk / (jnp.sum(weights_Nk, axis=-1, keepdims=True)
                                       + (1e-20 if cfg.router == "sigmoid" else 0.0))
        if cfg.routed_scaling_factor != 1.0:
            weights_Nk = weights_Nk * cfg.routed_scaling_factor
        return probs_NE, weights_Nk, ids_Nk

    def _grouped_top_k(self, choice_NE):
        """Top-k experts among the ``topk_group`` groups whose two best scores sum highest."""
        cfg = self.cfg
        N, E = choice_NE.shape
        if cfg.n_group > 1:
            by_group = choice_NE.reshape(N, cfg.n_group, E // cfg.n_group)
            group_NG = jnp.sum(jax.lax.top_k(by_group, 2)[0], axis=-1)
            _, keep_Ng = jax.lax.top_k(group_NG, cfg.topk_group)
            keep_NG = jnp.zeros((N, cfg.n_group), bool).at[
                jnp.arange(N)[:, None], keep_Ng].set(True)
            choice_NE = jnp.where(jnp.repeat(keep_NG, E // cfg.n_group, axis=1), choice_NE,
                                  -jnp.inf)
        return jax.lax.top_k(choice_NE, cfg.num_experts_per_tok)[1]

    def aux_loss(self, probs_NE, ids_Nk, valid_N=None):
        """Switch-style load balance: E * sum_e (share of routed slots to e) * (mean prob of e)."""
        E = self.cfg.num_experts
        w = jnp.ones(probs_NE.shape[0], jnp.float32) if valid_N is None else valid_N.astype(
            jnp.float32)
        denom = jnp.maximum(jnp.sum(w), 1.0)
        routed_NkE = jax.nn.one_hot(ids_Nk, E, dtype=jnp.float32)
        frac_kE = jnp.einsum("nke,n->ke", routed_NkE, w) / denom
        prob_E = jnp.einsum("ne,n->e", probs_NE, w) / denom
        return E * jnp.sum(frac_kE * prob_E[None, :])

    def __call__(self, x_BTD, valid_BT=None, expert_ids_BTk=None):
        """Returns (y_BTD, aux_loss); ``expert_ids_BTk`` replays recorded routing."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        replay = None if expert_ids_BTk is None else expert_ids_BTk.reshape(B * T, -1)
        probs_NE, weights_Nk, ids_Nk = self.route(x_ND, replay)
        if self.record_routing:
            self.sow(nnx.Intermediate, "expert_ids", ids_Nk.reshape(B, T, -1))
        aux = self.aux_loss(probs_NE, ids_Nk, None if valid_BT is None else valid_BT.reshape(-1))
        impl = resolve_impl(self.cfg.moe_impl)
        if impl == "dense":
            y_BTD = self._dense(x_ND, weights_Nk, ids_Nk).reshape(B, T, D)
        else:
            y_BTD = self._dispatched(x_BTD, weights_Nk.reshape(B, T, -1),
                                     ids_Nk.reshape(B, T, -1), impl)
        return y_BTD, aux

    def _dense(self, x_ND, weights_Nk, ids_Nk):
        dt = x_ND.dtype
        combine_NE = jnp.sum(jax.nn.one_hot(ids_Nk, self.cfg.num_experts, dtype=jnp.float32)
                             * weights_Nk[..., None], axis=1)
        g = jnp.einsum("nd,edf->nef", x_ND, self.gate_proj[...].astype(dt))
        u = jnp.einsum("nd,edf->nef", x_ND, self.up_proj[...].astype(dt))
        y_NED = jnp.einsum("nef,efd->ned", jax.nn.silu(g) * u, self.down_proj[...].astype(dt))
        return jnp.einsum("ned,ne->nd", y_NED, combine_NE.astype(dt))

    def _dispatched(self, x_BTD, weights_BTk, ids_BTk, impl):
        dt = x_BTD.dtype
        E = self.cfg.num_experts
        ws = tuple(p[...].astype(dt) for p in (self.gate_proj, self.up_proj, self.down_proj))
        ctx = current_sharding()
        if ctx is None or ctx.mesh is None or ctx.mesh.size == 1:
            B, T, D = x_BTD.shape
            y = dispatch(x_BTD.reshape(B * T, D), weights_BTk.reshape(B * T, -1),
                         ids_BTk.reshape(B * T, -1), *ws, impl=impl, num_experts=E)
            return y.reshape(B, T, D)
        return sharded_dispatch(ctx, x_BTD, weights_BTk, ids_BTk, ws, impl=impl, num_experts=E)


def routing_dtype(num_experts: int):
    """The narrowest integer holding an expert id (a routing record's dtype): one byte per id
    up to 256 experts."""
    return np.uint8 if num_experts <= 256 else np.int16 if num_experts <= 32767 else np.int32


def resolve_impl(impl: str) -> str:
    """``auto`` -> the backend's grouped matmul: the mesh's devices' platform, else JAX's."""
    if impl != "auto":
        return impl
    ctx = current_sharding()
    mesh = getattr(ctx, "mesh", None)
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return {"tpu": "megablox", "gpu": "ragged", "cuda": "ragged", "rocm": "ragged"}.get(
        platform, "blocked")


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def sharded_dispatch(ctx, x_BTD, weights_BTk, ids_BTk, ws, *, impl: str, num_experts: int):
    """``dispatch`` under ``shard_map`` on the active mesh.

    Tokens keep their activation sharding; expert weights enter split over the expert and F
    axes their rules give them and whole over the rest (the FSDP all-gather happens at the
    boundary, its transpose reduce-scatters the weight gradient). Where the batch is not
    already split over the expert axis, each expert shard takes 1/ep of its tokens and the
    outputs are gathered back; partial sums over a sharded F are added with a ``psum``.
    """
    from jax.sharding import PartitionSpec as P

    mesh = ctx.mesh
    B, T, D = x_BTD.shape
    w_gate, w_up, w_down = ws
    tok = ctx.spec(("batch", "length", None), (B, T, D))
    wspec = ctx.spec(("expert", "embed", "mlp"), w_gate.shape)
    e_axes, f_axes = _axes(wspec[0]), _axes(wspec[2])
    tok_axes = _axes(tok[0]) + _axes(tok[1])
    ep = int(np_prod(mesh.shape[a] for a in e_axes))
    split = ep > 1 and not set(e_axes) & set(tok_axes)
    e_name = e_axes[0] if len(e_axes) == 1 else (e_axes or None)
    f_name = f_axes[0] if len(f_axes) == 1 else (f_axes or None)
    ragged_a2a = mesh.devices.flat[0].platform != "cpu"

    def body(x, w, ids, wg, wu, wd):
        b, t, _ = x.shape
        x, w, ids = x.reshape(b * t, D), w.reshape(b * t, -1), ids.reshape(b * t, -1)
        n = b * t
        if split:  # every expert shard holds these tokens: each dispatches its share
            share = -(-n // ep)
            pad = share * ep - n
            if pad:
                x, w, ids = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, w, ids))
            i = jax.lax.axis_index(e_name)
            x, w, ids = (jax.lax.dynamic_slice_in_dim(a, i * share, share) for a in (x, w, ids))
        y = dispatch(x, w, ids, wg, wu, wd, impl=impl, num_experts=num_experts,
                     ep_axis=e_name, ep_size=ep, ragged_a2a=ragged_a2a)
        if f_name is not None:
            y = jax.lax.psum(y, f_name)
        if split:
            y = jax.lax.all_gather(y, e_name, tiled=True)[:n]
        return y.reshape(b, t, D)

    w_in = P(e_name, None, f_name)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in,
                                                  P(e_name, f_name, None)), out_specs=tok,
                       check_vma=False)
    return fn(x_BTD, weights_BTk, ids_BTk, w_gate, w_up, w_down)


def np_prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
