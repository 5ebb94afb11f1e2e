"""Llama 3.x (``LlamaForCausalLM``: Llama 3 RoPE scaling, no QK-norm, tied or untied head) and
its Qwen2 / Qwen2.5 variant (``Qwen2ForCausalLM``: biases on q/k/v)."""

from models.config import ModelConfig
from models.llama.hf import ARCHITECTURES, MODEL_TYPES, config_kwargs, hf_config, param_table
from models.llama.model import Model

_LLAMA3_ROPE = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192.0}


def _llama(name, **kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=128_256, head_dim=128, qk_norm=False,
                rope_theta=500_000.0, rms_norm_eps=1e-5, max_position_embeddings=131_072,
                dtype="bfloat16", param_dtype="bfloat16")
    base.update(kw)
    return ModelConfig(name=name, **base)


PRESETS = {
    "llama-3.2-1b": lambda: _llama("llama-3.2-1b", hidden_size=2048, intermediate_size=8192,
                                   num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                   tie_word_embeddings=True, rope_scaling=_LLAMA3_ROPE),
    "llama-3.1-8b": lambda: _llama("llama-3.1-8b", hidden_size=4096, intermediate_size=14_336,
                                   num_layers=32, num_heads=32, num_kv_heads=8,
                                   rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
    "tiny-llama": lambda: _llama("tiny-llama", vocab_size=128, hidden_size=64,
                                 intermediate_size=128, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                                 rope_scaling=dict(_LLAMA3_ROPE, factor=8.0,
                                                   original_max_position_embeddings=64.0),
                                 dtype="float32", param_dtype="float32"),
}

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "Model", "PRESETS", "config_kwargs", "hf_config",
           "param_table"]
