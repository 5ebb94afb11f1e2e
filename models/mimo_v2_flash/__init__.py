"""MiMo-V2-Flash (``MiMoV2FlashForCausalLM``, model_type ``mimo_v2_flash``), MOPD's own
deployment model: hybrid sliding-window / full attention (sliding layers with twice the KV
heads and learnable per-head sinks), q/k heads wider than the value heads, values scaled by a
constant, partial rotary with a RoPE base per layer kind, a dense first MLP, and
DeepSeek-V3-style grouped sigmoid routing with a correction bias and no shared experts."""

from models.config import ModelConfig
from models.mimo_v2_flash.hf import (ARCHITECTURES, MODEL_TYPES, SKIPPED_PREFIXES,
                                     config_kwargs, hf_config, param_table)
from models.mimo_v2_flash.model import Model


def default_layer_types(n: int) -> tuple[str, ...]:
    """transformers' default: full attention at layer 0 and every 6th layer, sliding elsewhere."""
    return tuple("full" if i == 0 or (i + 1) % 6 == 0 else "sliding" for i in range(n))


def mimo_config(name: str, *, num_layers: int, num_kv_heads: int, **kw) -> ModelConfig:
    """A MiMo-V2-Flash-family config: the family's fixed traits plus the sizes given."""
    base = dict(family="mimo_v2_flash", qk_norm=False, attention_sink="sliding",
                layer_types=default_layer_types(num_layers), num_layers=num_layers,
                num_kv_heads=num_kv_heads, sliding_num_kv_heads=2 * num_kv_heads,
                router="sigmoid", mlp_only_layers=(0,), norm_topk_prob=True,
                attention_value_scale=0.707, partial_rotary_factor=0.334)
    base.update(kw)
    return ModelConfig(name=name, **base)


PRESETS = {
    # The published model: 309B parameters in all, 15B active per token (num_params()).
    "mimo-v2-flash": lambda: mimo_config(
        "mimo-v2-flash", vocab_size=152_576, hidden_size=4096, intermediate_size=16_384,
        num_layers=48, num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=128,
        sliding_window=128, rope_theta=5_000_000.0, sliding_rope_theta=10_000.0,
        rms_norm_eps=1e-5, max_position_embeddings=262_144, num_experts=256,
        num_experts_per_tok=8, moe_intermediate_size=2048, dtype="bfloat16",
        param_dtype="bfloat16"),
    # Tests and CPU runs: every MiMo trait at toy size (groups, window 4 < the rows).
    "tiny-mimo": lambda: mimo_config(
        "tiny-mimo", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=6,
        num_heads=4, num_kv_heads=1, head_dim=24, v_head_dim=16, sliding_window=4,
        rope_theta=50_000.0, sliding_rope_theta=10_000.0, max_position_embeddings=512,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=4,
        topk_group=2, routed_scaling_factor=2.5),
}

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "Model", "PRESETS", "SKIPPED_PREFIXES",
           "config_kwargs", "hf_config", "mimo_config", "param_table"]
