"""What every model family provides: the seam between ``models/`` and ``mopd_jax/``.

``mopd_jax`` holds models only through this protocol and builds them with
``models.build(cfg, rngs)``; it never imports a family module.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from models.config import ModelConfig


@runtime_checkable
class CausalLM(Protocol):
    cfg: ModelConfig

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, *,
                 cache: list | None = None, valid_BT: jax.Array | None = None,
                 expert_ids: dict[int, jax.Array] | None = None
                 ) -> tuple[jax.Array, list | None, jax.Array]:
        """(hidden_BTD after the final norm, updated cache or None, MoE aux loss)."""

    def lm_head_weight(self) -> jax.Array:
        """The [D, V] output projection."""

    def logits(self, hidden_BTD: jax.Array) -> jax.Array:
        """Float32 [B, T, V] logits of ``hidden_BTD``."""

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list:
        """An empty KV cache for ``batch`` rows of ``max_len`` positions."""

    def cache_axes(self) -> list:
        """Logical axes of each cache leaf (same structure as ``init_cache``)."""

    def moe_layers(self) -> tuple[int, ...]:
        """Blocks with routed experts; ``models.forward_with_routing`` returns their
        per-token expert ids and ``expert_ids=`` replays them."""
