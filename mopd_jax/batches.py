"""The batches a train step consumes, one pytree dataclass per kind, declared once.

Rows are aligned with ``tokens_BT`` (position t holds token t and what the sampler said of
it); the objectives shift them (position t of the model predicts token t + 1). Shape letters:
the glossary in ``models/config.py``. Built on the host (numpy) by the recipes, or as
``jax.ShapeDtypeStruct``s by compile-check; optional fields are None.
"""

from __future__ import annotations

import jax
from flax import struct

from mopd_jax.estimators import TeacherScores


@struct.dataclass
class SFTBatch:
    """Supervised rows: prompt + target; ``mask_BT`` 1 on the target tokens."""

    tokens_BT: jax.Array
    mask_BT: jax.Array
    domain_B: jax.Array | None = None


@struct.dataclass
class GRPOBatch:
    """Groups of rollouts (G per prompt, contiguous) with their outcome advantages."""

    tokens_BT: jax.Array
    mask_BT: jax.Array
    domain_B: jax.Array
    sampler_logp_BT: jax.Array  # the behaviour policy (one update per batch)
    adv_B: jax.Array
    reward_B: jax.Array | None = None
    ref_logp_BT: jax.Array | None = None  # pi_0's log-probs when grpo.kl_coef > 0
    expert_ids_BTLk: jax.Array | None = None  # the sampler's routing (grpo.router_replay)


@struct.dataclass
class MOPDBatch:
    """Student rollouts with their domain teacher's scores (for targets ``tokens[:, 1:]``)."""

    tokens_BT: jax.Array
    mask_BT: jax.Array
    domain_B: jax.Array
    sampler_logp_BT: jax.Array | None
    teacher: TeacherScores
    reward_B: jax.Array | None = None
    orm_adv_B: jax.Array | None = None  # group advantage for alpha * A_ORM (n >= 2)
    # [B, T, L_moe, k]: the experts the sampler's MoE layers chose for token t (router replay,
    # ``mopd.router_replay``); the student's forward uses them instead of routing anew
    expert_ids_BTLk: jax.Array | None = None
