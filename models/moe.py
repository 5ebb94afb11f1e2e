"""Mixture-of-experts block: router (softmax top-k, or DeepSeek-V3 grouped sigmoid), dropless
sort-based dispatch.

Routing decisions are visible to callers: ``models.forward_with_routing`` has each block sow
its [B, T, k] expert ids (``nnx.Intermediate('expert_ids')``), and a call given
``expert_ids`` uses them instead of choosing (router replay), with the gate weights
recomputed from the current router at those experts so the router still learns.

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
