"""Mixture-of-experts block: softmax router, top-k, dropless sort-based dispatch.

Two paths compute the same function:
  * ``ragged``: sort the N*k (token, expert) pairs by expert and run each expert's SwiGLU as
    one grouped matmul with ``jax.lax.ragged_dot``; no capacity, no dropped tokens.
  * ``dense``: every expert on every token, weighted by the (mostly zero) combine matrix; the
    reference the ragged path is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import constrain, param


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.router = param(rngs, (D, E), ("embed", None), cfg)
        self.gate_proj = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg, fan_in=D)
        self.up_proj = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg, fan_in=D)
        self.down_proj = param(rngs, (E, F, D), ("expert", "mlp", "embed"), cfg, fan_in=F)

    def route(self, x_ND):
        """Router probabilities (fp32), the top-k weights and expert ids."""
        cfg = self.cfg
        logits_NE = jnp.einsum("nd,de->ne", x_ND, self.router[...].astype(x_ND.dtype),
                               preferred_element_type=jnp.float32)
        probs_NE = jax.nn.softmax(logits_NE, axis=-1)
        weights_Nk, ids_Nk = jax.lax.top_k(probs_NE, cfg.num_experts_per_tok)
        if cfg.norm_topk_prob:
            weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
        return probs_NE, weights_Nk, ids_Nk

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

    def __call__(self, x_BTD, valid_BT=None):
        """Returns (y_BTD, aux_loss)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        probs_NE, weights_Nk, ids_Nk = self.route(x_ND)
        aux = self.aux_loss(probs_NE, ids_Nk, None if valid_BT is None else valid_BT.reshape(-1))
        if self.cfg.moe_impl == "dense":
            y_ND = self._dense(x_ND, weights_Nk, ids_Nk)
        else:
            y_ND = self._ragged(x_ND, weights_Nk, ids_Nk)
        return y_ND.reshape(B, T, D), aux

    def _dense(self, x_ND, weights_Nk, ids_Nk):
        dt = x_ND.dtype
        combine_NE = jnp.sum(jax.nn.one_hot(ids_Nk, self.cfg.num_experts, dtype=jnp.float32)
                             * weights_Nk[..., None], axis=1)
        g = jnp.einsum("nd,edf->nef", x_ND, self.gate_proj[...].astype(dt))
        u = jnp.einsum("nd,edf->nef", x_ND, self.up_proj[...].astype(dt))
        y_NED = jnp.einsum("nef,efd->ned", jax.nn.silu(g) * u, self.down_proj[...].astype(dt))
        return jnp.einsum("ned,ne->nd", y_NED, combine_NE.astype(dt))

    def _ragged(self, x_ND, weights_Nk, ids_Nk):
        dt = x_ND.dtype
        N, k = ids_Nk.shape
        E = self.cfg.num_experts
        flat_ids = ids_Nk.reshape(-1)                       # [N*k]
        order = jnp.argsort(flat_ids, stable=True)          # pairs grouped by expert
        token_of = order // k
        x_sorted = constrain(x_ND[token_of], ("tokens", "embed"))
        group_sizes = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
        g = jax.lax.ragged_dot(x_sorted, self.gate_proj[...].astype(dt), group_sizes)
        u = jax.lax.ragged_dot(x_sorted, self.up_proj[...].astype(dt), group_sizes)
        y_sorted = jax.lax.ragged_dot(jax.nn.silu(g) * u, self.down_proj[...].astype(dt),
                                      group_sizes)
        w_sorted = weights_Nk.reshape(-1)[order].astype(dt)
        y_ND = jnp.zeros((N, x_ND.shape[1]), dt).at[token_of].add(y_sorted * w_sorted[:, None])
        return y_ND
