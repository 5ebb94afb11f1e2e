"""Model configuration: one frozen dataclass for Qwen3 dense and Qwen3-MoE, plus named presets.

Shape alphabet used across `models/` (written once here):
  B batch, T time (query positions), S key/cache positions, D model width, H query heads,
  K kv heads, G query heads per kv head (H = K*G), Hd head dim, F ffn width, E experts,
  k experts per token (``top_k``), V vocab, N flattened tokens (B*T).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

DType = Literal["float32", "bfloat16"]
LayerType = Literal["full", "sliding"]


class ModelConfigError(ValueError):
    """A model configuration value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen3-family decoder (dense when ``num_experts == 0``)."""

    name: str = "custom"
    """Preset or model name, for logs only."""
    vocab_size: int = 128
    """Vocabulary size V (rows of the embedding, columns of the lm_head)."""
    hidden_size: int = 64
    """Model width D."""
    intermediate_size: int = 128
    """FFN width F of dense MLP layers."""
    num_layers: int = 2
    """Number of decoder blocks."""
    num_heads: int = 4
    """Query heads H."""
    num_kv_heads: int = 2
    """Key/value heads K (GQA); must divide ``num_heads``."""
    head_dim: int = 16
    """Per-head width Hd (Qwen3 decouples it from D / H)."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    tie_word_embeddings: bool = False
    """Use the embedding matrix as the lm_head (Qwen3-0.6B/1.7B do)."""
    qk_norm: bool = True
    """RMSNorm over Hd on queries and keys before RoPE (Qwen3)."""
    max_position_embeddings: int = 40_960
    """Longest position the model was trained for (informational; caches may be shorter)."""
    # --- attention layout (MiMo-V2-Flash style hybrids) ---
    layer_types: tuple[LayerType, ...] | None = None
    """Per-layer attention kind, 'full' or 'sliding'; None means all full."""
    sliding_window: int | None = None
    """Window of 'sliding' layers: a query attends to the last ``sliding_window`` keys."""
    attention_sink: bool = False
    """Learnable per-head sink logit added to each softmax denominator (MiMo-V2-Flash)."""
    # --- mixture of experts ---
    num_experts: int = 0
    """Routed experts E; 0 makes every layer a dense MLP."""
    num_experts_per_tok: int = 2
    """Experts k chosen per token."""
    moe_intermediate_size: int = 32
    """FFN width of one expert."""
    norm_topk_prob: bool = True
    """Renormalise the k routing weights to sum to 1 (Qwen3-30B-A3B does)."""
    decoder_sparse_step: int = 1
    """Layer i is MoE when (i + 1) % step == 0 (and not in ``mlp_only_layers``)."""
    mlp_only_layers: tuple[int, ...] = ()
    """Layer indices forced to a dense MLP inside an MoE model."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing auxiliary loss."""
    moe_impl: Literal["ragged", "dense"] = "ragged"
    """'ragged': sort-based dropless dispatch through lax.ragged_dot; 'dense': every expert on
    every token (the reference path, only for tests and tiny models)."""
    # --- numerics ---
    dtype: DType = "float32"
    """Compute dtype of activations; logits and softmaxes are always float32."""
    param_dtype: DType = "float32"
    """Storage dtype of parameters."""

    def __post_init__(self):
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise ModelConfigError(f"model.{field}: {msg}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            need(len(self.layer_types) == self.num_layers, "layer_types",
                 f"needs {self.num_layers} entries (one per layer), got {len(self.layer_types)}")
            bad = sorted(set(self.layer_types) - {"full", "sliding"})
            need(not bad, "layer_types", f"entries must be 'full' or 'sliding', got {bad}")
            if "sliding" in self.layer_types:
                need(self.sliding_window is not None and self.sliding_window > 0,
                     "sliding_window", "must be a positive int when any layer is 'sliding'")
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.num_experts:
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}")
            need(self.decoder_sparse_step >= 1, "decoder_sparse_step", "must be >= 1")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        need(self.moe_impl in ("ragged", "dense"), "moe_impl", "must be 'ragged' or 'dense'")
        for f in ("dtype", "param_dtype"):
            need(getattr(self, f) in ("float32", "bfloat16"), f,
                 f"must be 'float32' or 'bfloat16', got {getattr(self, f)!r}")

    # ------------------------------------------------------------------ derived
    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` uses the routed-expert MLP (Hugging Face's rule)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    def layer_type(self, i: int) -> LayerType:
        return "full" if self.layer_types is None else self.layer_types[i]

    @property
    def is_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_layers))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embedding and lm_head counted separately unless tied)."""
        D, Hd = self.hidden_size, self.head_dim
        attn = D * Hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * D
        attn += 2 * Hd if self.qk_norm else 0
        attn += self.num_heads if self.attention_sink else 0
        total = self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        for i in range(self.num_layers):
            if self.is_moe_layer(i):
                mlp = D * self.num_experts + 3 * self.num_experts * D * self.moe_intermediate_size
            else:
                mlp = 3 * D * self.intermediate_size
            total += attn + mlp
        return total


def hybrid_layer_types(num_layers: int, sliding_per_global: int = 5) -> tuple[LayerType, ...]:
    """MiMo-V2-Flash layout: ``sliding_per_global`` sliding layers, then one global, repeated."""
    period = sliding_per_global + 1
    return tuple("full" if (i + 1) % period == 0 else "sliding" for i in range(num_layers))


def _qwen3(name, **kw) -> ModelConfig:
    base = dict(vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                max_position_embeddings=40_960, dtype="bfloat16", param_dtype="bfloat16")
    base.update(kw)
    return ModelConfig(name=name, **base)


PRESETS = {
    # Tests and the demo: runs in milliseconds on one CPU core.
    "tiny": lambda: ModelConfig(name="tiny", vocab_size=128, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                rope_theta=10_000.0, max_position_embeddings=512),
    "tiny-moe": lambda: ModelConfig(name="tiny-moe", vocab_size=128, hidden_size=64,
                                    intermediate_size=128, num_layers=3, num_heads=4,
                                    num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                                    max_position_embeddings=512, num_experts=8,
                                    num_experts_per_tok=2, moe_intermediate_size=32,
                                    mlp_only_layers=(0,)),
    # The demo student: an MoE over the 31-symbol alphabet of the built-in domains.
    "demo-moe": lambda: ModelConfig(name="demo-moe", vocab_size=32, hidden_size=64,
                                    intermediate_size=128, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                                    max_position_embeddings=64, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=64,
                                    mlp_only_layers=(0,), moe_impl="dense"),
    "qwen3-0.6b": lambda: _qwen3("qwen3-0.6b", hidden_size=1024, intermediate_size=3072,
                                 num_layers=28, num_heads=16, num_kv_heads=8,
                                 tie_word_embeddings=True),
    "qwen3-1.7b": lambda: _qwen3("qwen3-1.7b", hidden_size=2048, intermediate_size=6144,
                                 num_layers=28, num_heads=16, num_kv_heads=8,
                                 tie_word_embeddings=True),
    "qwen3-8b": lambda: _qwen3("qwen3-8b", hidden_size=4096, intermediate_size=12288,
                               num_layers=36, num_heads=32, num_kv_heads=8),
    "qwen3-30b-a3b": lambda: _qwen3("qwen3-30b-a3b", hidden_size=2048, intermediate_size=6144,
                                    num_layers=48, num_heads=32, num_kv_heads=4, num_experts=128,
                                    num_experts_per_tok=8, moe_intermediate_size=768,
                                    norm_topk_prob=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named model preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ModelConfigError(f"model.preset: unknown preset {name!r}; choose one of "
                               f"{sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
