"""Qwen3 and Qwen3-MoE (``Qwen3ForCausalLM``, ``Qwen3MoeForCausalLM``): QK-norm, GQA, plain
RoPE, softmax top-k experts where the config puts them."""

from models.config import ModelConfig
from models.qwen3.hf import ARCHITECTURES, MODEL_TYPES, config_kwargs, hf_config, param_table
from models.qwen3.model import Model


def _qwen3(name, **kw) -> ModelConfig:
    base = dict(vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                max_position_embeddings=40_960, dtype="bfloat16", param_dtype="bfloat16")
    base.update(kw)
    return ModelConfig(name=name, family="qwen3", **base)


PRESETS = {
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

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "Model", "PRESETS", "config_kwargs", "hf_config",
           "param_table"]
