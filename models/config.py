"""Model configuration: one frozen dataclass for every family, plus named presets.

The fields describe a decoder-only transformer (embed -> blocks of attention + MLP/MoE -> norm)
as the union of what the families need; ``family`` names which one builds it (``models.build``)
and which Hugging Face mapping reads and writes it. Family presets live beside their family
(``models/<family>/__init__.py``); ``preset(name)`` finds them through the registry.

The shape glossary of the whole project (``models/`` and ``mopd_jax/``), one meaning per
letter, used as name suffixes (``logits_BTV``, ``w_EDF``):
  B batch rows (sequences, decode slots), T time (query positions), S key/cache positions,
  D model width, H query heads, K kv heads (H = K * Q, Q query heads per kv head), Hd q/k
  head dim, Vd value head dim, F ffn width, E experts, k chosen per row (experts per token,
  a teacher's top-k ids), V vocab, N flattened tokens (B*T), M domains (one teacher each),
  G rollouts per prompt (a GRPO group), P prompts (a prefill batch), Z stop ids per request.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

DType = Literal["float32", "bfloat16"]
LayerType = Literal["full", "sliding"]
ROUTERS = ("softmax", "sigmoid")
MOE_IMPLS = ("auto", "megablox", "ragged", "blocked", "dense")
SINK_LAYERS = ("none", "all", "sliding")
RUNTIME_FIELDS = ("attention_impl", "scan_layers", "remat", "moe_impl")
"""How a model runs, not what it is: settable on top of a checkpoint's own config."""
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "splash", "cudnn", "pallas_gpu")
REMATS = ("none", "full", "save_dots", "save_attention", "offload")


class ModelConfigError(ValueError):
    """A model configuration value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder of any registered family (dense when ``num_experts == 0``)."""

    name: str = "custom"
    """Preset or model name, for logs only."""
    family: str = "qwen3"
    """Model family (``models.registry.FAMILIES``): which module builds the model and maps its
    Hugging Face weights. A ``model.json`` written before families existed loads as qwen3."""
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
    v_head_dim: int | None = None
    """Per-head width of values (MiMo-V2-Flash: 128 beside a 192 q/k head); None = head_dim."""
    attention_bias: bool = False
    """Biases on the q/k/v projections (Qwen2/Qwen2.5; optional in MiMo-V2-Flash)."""
    attention_value_scale: float = 1.0
    """Constant multiplier on the values before they are cached (MiMo-V2-Flash: 0.707)."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency (of 'full' layers when ``sliding_rope_theta`` is set)."""
    sliding_rope_theta: float | None = None
    """RoPE base of 'sliding' layers (MiMo-V2-Flash: 10k beside 5M); None = rope_theta."""
    partial_rotary_factor: float = 1.0
    """Fraction of the q/k head that is rotated (the first ``int(head_dim * f)`` dims)."""
    rope_scaling: dict[str, float] | tuple[tuple[str, float], ...] | None = None
    """Family-specific RoPE frequency scaling, e.g. Llama 3's ``{factor: 32.0,
    low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}``;
    stored as sorted (name, value) pairs (hashable); None = plain RoPE."""
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
    sliding_num_kv_heads: int | None = None
    """KV heads of 'sliding' layers (MiMo-V2-Flash: twice the full layers'); None = same."""
    attention_sink: Literal["none", "all", "sliding"] | bool = "none"
    """Which layers add a learnable per-head sink logit to each softmax denominator
    (MiMo-V2-Flash: 'sliding'). ``true``/``false`` read as 'all'/'none'."""
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
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing auxiliary loss in every training objective (a Hugging
    Face checkpoint brings its own)."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """'softmax': top-k of softmax probabilities (Qwen3-MoE). 'sigmoid': DeepSeek-V3 routing
    (MiMo-V2-Flash): sigmoid scores; a per-expert correction bias chooses the experts but does
    not weight them; grouped top-k over ``n_group`` groups."""
    n_group: int = 1
    """Expert groups of the sigmoid router; ``topk_group`` of them are eligible per token."""
    topk_group: int = 1
    """Groups eligible per token (ranked by the sum of their two best biased scores)."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routing weights after (optional) renormalisation."""
    moe_impl: Literal["auto", "megablox", "ragged", "blocked", "dense"] = "auto"
    """How routed experts run (``models/moe.py``): 'megablox' (Pallas grouped matmul, TPU),
    'ragged' (lax.ragged_dot, GPU), 'blocked' (a blocked grouped matmul, CPU), 'auto' (the
    backend's: megablox on TPU, ragged on GPU, blocked on CPU), all dropless with per-device
    dispatch; 'dense': every expert on every token (the reference, tests and tiny models)."""
    # --- long rows ---
    attention_impl: Literal["auto", "reference", "blockwise", "splash", "cudnn",
                            "pallas_gpu"] = "auto"
    """Attention backend (``models.attention``): 'auto' = splash on TPU, cuDNN on GPU, and
    elsewhere the dense 'reference' for rows of one block (<= 512) or 'blockwise' (linear
    memory) beyond; cached decode is blockwise over the live part of the cache."""
    scan_layers: bool | None = None
    """Run the blocks as a ``lax.scan`` over stacked parameters (one compiled body per run of
    identical blocks). None = on for models of 16 or more layers."""
    remat: Literal["none", "full", "save_dots", "save_attention", "offload"] = "none"
    """Activation checkpointing of each block in training: 'full' recomputes the block,
    'save_dots' keeps matmul outputs, 'save_attention' keeps the attention output and the MoE
    combine (tags ``attn_out``, ``moe_out``), 'offload' keeps those in pinned host memory."""
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
        need(self.family.replace("_", "").isalnum(), "family",
             f"must be a family name, got {self.family!r}")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        need(self.v_head_dim is None or self.v_head_dim > 0, "v_head_dim",
             f"must be positive or null, got {self.v_head_dim}")
        need(0.0 < self.partial_rotary_factor <= 1.0 and self.rotary_dim % 2 == 0
             and self.rotary_dim > 0, "partial_rotary_factor",
             f"must be in (0, 1] and rotate an even number of dims, got "
             f"{self.partial_rotary_factor} (int(head_dim * f) = {self.rotary_dim})")
        if isinstance(self.attention_sink, bool):  # model.json / YAML written before 'sliding'
            object.__setattr__(self, "attention_sink", "all" if self.attention_sink else "none")
        need(self.attention_sink in SINK_LAYERS, "attention_sink",
             f"must be one of {list(SINK_LAYERS)} (or true/false), got {self.attention_sink!r}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        elif self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(tuple(p) for p in self.rope_scaling))
        if self.sliding_num_kv_heads is not None:
            need(self.sliding_num_kv_heads > 0 and self.num_heads % self.sliding_num_kv_heads
                 == 0, "sliding_num_kv_heads",
                 f"must divide num_heads={self.num_heads}, got {self.sliding_num_kv_heads}")
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
            need(self.router in ROUTERS, "router",
                 f"must be one of {list(ROUTERS)}, got {self.router!r}")
            need(self.n_group >= 1 and self.num_experts % self.n_group == 0, "n_group",
                 f"must divide num_experts={self.num_experts}, got {self.n_group}")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            need(self.topk_group * (self.num_experts // self.n_group)
                 >= self.num_experts_per_tok, "topk_group",
                 f"{self.topk_group} groups of {self.num_experts // self.n_group} experts "
                 f"cannot supply num_experts_per_tok={self.num_experts_per_tok}")
            need(self.n_group == 1 or self.num_experts // self.n_group >= 2, "n_group",
                 "each group needs at least 2 experts (groups are ranked by their top 2)")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
             f"must be one of {list(ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        need(self.remat in REMATS, "remat", f"must be one of {list(REMATS)}, got {self.remat!r}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {list(MOE_IMPLS)}")
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

    def kv_heads(self, i: int) -> int:
        """KV heads of block ``i`` (sliding layers may have their own count)."""
        if self.layer_type(i) == "sliding" and self.sliding_num_kv_heads is not None:
            return self.sliding_num_kv_heads
        return self.num_kv_heads

    def has_sinks(self, i: int) -> bool:
        return self.attention_sink == "all" or (self.attention_sink == "sliding"
                                                and self.layer_type(i) == "sliding")

    def layer_rope_theta(self, i: int) -> float:
        if self.layer_type(i) == "sliding" and self.sliding_rope_theta is not None:
            return self.sliding_rope_theta
        return self.rope_theta

    @property
    def value_dim(self) -> int:
        """Vd: the value head width."""
        return self.v_head_dim or self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Leading q/k dims that RoPE rotates (Hugging Face's ``int(head_dim * factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_layers))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, active: bool = False) -> int:
        """Parameter count (embedding and lm_head counted separately unless tied); with
        ``active``, MoE layers count only the ``num_experts_per_tok`` experts a token uses."""
        D, H, Hd, Vd = self.hidden_size, self.num_heads, self.head_dim, self.value_dim
        total = self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        for i in range(self.num_layers):
            K = self.kv_heads(i)
            attn = D * (H + K) * Hd + D * K * Vd + H * Vd * D + 2 * D
            attn += (H + K) * Hd + K * Vd if self.attention_bias else 0
            attn += 2 * Hd if self.qk_norm else 0
            attn += H if self.has_sinks(i) else 0
            if self.is_moe_layer(i):
                experts = self.num_experts_per_tok if active else self.num_experts
                mlp = D * self.num_experts + 3 * experts * D * self.moe_intermediate_size
                mlp += self.num_experts if self.router == "sigmoid" else 0
            else:
                mlp = 3 * D * self.intermediate_size
            total += attn + mlp
        return total


def hybrid_layer_types(num_layers: int, sliding_per_global: int = 5) -> tuple[LayerType, ...]:
    """MiMo-V2-Flash layout: ``sliding_per_global`` sliding layers, then one global, repeated."""
    period = sliding_per_global + 1
    return tuple("full" if (i + 1) % period == 0 else "sliding" for i in range(num_layers))


# Shared tiny presets (tests, the demo); real sizes live with their family.
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
}


def all_presets() -> dict:
    """Every preset: the shared ones above and each registered family's ``PRESETS``."""
    from models import registry

    out = dict(PRESETS)
    for fam in registry.FAMILIES:
        out.update(getattr(registry.family(fam), "PRESETS", {}))
    return out


def preset(name: str, **overrides) -> ModelConfig:
    """A named model preset, optionally with fields replaced."""
    presets = all_presets()
    if name not in presets:
        raise ModelConfigError(f"model.preset: unknown preset {name!r}; choose one of "
                               f"{sorted(presets)}")
    return presets[name]().replace(**overrides) if overrides else presets[name]()
