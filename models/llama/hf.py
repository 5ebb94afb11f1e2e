"""Llama 3.x and Qwen2 / Qwen2.5 config.json and weights (the shared decoder keys)."""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import HFCheckpointError, RequiredFields, decoder_table, hf_dtype, hf_layer_types

MODEL_TYPES = ("llama", "qwen2")
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
param_table = decoder_table
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def config_kwargs(c: RequiredFields) -> dict:
    qwen2 = c.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in (c.get("architectures")
                                                                     or ())
    if c.get("mlp_bias"):
        c.fail("mlp_bias=true is not supported by the Llama family here")
    if not qwen2 and c.get("attention_bias"):
        c.fail("attention_bias=true (a bias on o_proj too) is not supported by the Llama "
               "family here")
    if c.get("hidden_act", "silu") != "silu":
        c.fail(f"hidden_act {c['hidden_act']!r} is not supported; only silu")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "llama3"):
        c.fail(f"rope type {kind!r} is not supported; default and llama3 are")
    scaling = None
    if kind == "llama3":
        absent = [k for k in _LLAMA3_KEYS if k not in rope]
        if absent:
            c.fail(f"rope_parameters: llama3 scaling needs {absent}")
        scaling = {k: float(rope[k]) for k in _LLAMA3_KEYS}
    n = c["num_hidden_layers"]
    layer_types = hf_layer_types(c, n) if qwen2 and c.get("use_sliding_window") else None
    dtype = hf_dtype(c)
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=n,
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        attention_bias=qwen2, qk_norm=False, rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=c.get("max_position_embeddings", 131_072),
        layer_types=layer_types if layer_types and "sliding" in layer_types else None,
        sliding_window=c.get("sliding_window") if layer_types else None,
        dtype=dtype, param_dtype=dtype)


def hf_config(cfg: ModelConfig) -> dict:
    """A ``config.json`` that transformers loads as Llama (or Qwen2 when q/k/v have biases)."""
    qwen2 = cfg.attention_bias
    for bad, field in [(cfg.qk_norm, "qk_norm"), (cfg.is_moe, "num_experts"),
                       (cfg.attention_sink != "none", "attention_sink"),
                       (cfg.v_head_dim not in (None, cfg.head_dim), "v_head_dim"),
                       (cfg.partial_rotary_factor != 1.0, "partial_rotary_factor"),
                       (cfg.attention_value_scale != 1.0, "attention_value_scale"),
                       (qwen2 and cfg.rope_scaling, "rope_scaling"),
                       (not qwen2 and cfg.layer_types is not None, "layer_types")]:
        if bad:
            raise HFCheckpointError(f"model.{field}: {'Qwen2' if qwen2 else 'Llama'} on the Hub "
                                    "cannot hold this setting; export this model as an Orbax "
                                    "checkpoint instead (`mopd convert --to orbax`)")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    c = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_dropout": 0.0,
        "dtype": cfg.param_dtype, "use_cache": True,
    }
    if qwen2:
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            raise HFCheckpointError("model.head_dim: Qwen2 derives head_dim = hidden_size / "
                                    "num_heads; export as an Orbax checkpoint instead")
        if cfg.layer_types is not None:
            c.update(use_sliding_window=True, sliding_window=cfg.sliding_window,
                     layer_types=["sliding_attention" if t == "sliding" else "full_attention"
                                  for t in cfg.layer_types])
    else:
        c.update(head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)
    return c
