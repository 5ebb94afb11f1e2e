"""Qwen3 / Qwen3-MoE config.json and weights (both transformers-5 spellings of each field)."""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import HFCheckpointError, RequiredFields, decoder_table, hf_dtype, hf_layer_types

MODEL_TYPES = ("qwen3", "qwen3_moe")
ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
param_table = decoder_table


def config_kwargs(c: RequiredFields) -> dict:
    arch = (c.get("architectures") or [None])[0]
    if c.get("attention_bias"):
        c.fail("attention_bias=true is not supported by the Qwen3 family here")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        c.fail(f"rope type {rope.get('rope_type')!r} is not supported; only default RoPE")
    n_layers = c["num_hidden_layers"]
    layer_types = hf_layer_types(c, n_layers)
    if layer_types is not None and "sliding" not in layer_types:
        layer_types = None
    num_experts = c.get("num_experts", c.get("num_local_experts", 0)) or 0
    if c.get("model_type") == "qwen3" or arch == "Qwen3ForCausalLM":
        num_experts = 0
    dtype = hf_dtype(c)
    kw = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=n_layers,
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        rope_theta=float(theta), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=c.get("max_position_embeddings", 40960),
        layer_types=layer_types,
        sliding_window=c.get("sliding_window") if layer_types else None,
        num_experts=num_experts, dtype=dtype, param_dtype=dtype,
    )
    if num_experts:
        kw.update(num_experts_per_tok=c["num_experts_per_tok"],
                  moe_intermediate_size=c["moe_intermediate_size"],
                  norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                  decoder_sparse_step=c.get("decoder_sparse_step", 1),
                  mlp_only_layers=tuple(c.get("mlp_only_layers") or ()),
                  router_aux_loss_coef=c.get("router_aux_loss_coef", 0.001))
    return kw


def hf_config(cfg: ModelConfig) -> dict:
    """A ``config.json`` that transformers loads as Qwen3 or Qwen3-MoE."""
    for bad, why in [(cfg.attention_sink != "none", "attention_sink: Qwen3 on the Hub has no "
                      "attention sinks"),
                     (cfg.v_head_dim not in (None, cfg.head_dim), "v_head_dim"),
                     (cfg.attention_bias, "attention_bias"),
                     (cfg.partial_rotary_factor != 1.0, "partial_rotary_factor"),
                     (cfg.sliding_num_kv_heads not in (None, cfg.num_kv_heads),
                      "sliding_num_kv_heads"),
                     (cfg.router != "softmax", "router"),
                     (cfg.attention_value_scale != 1.0, "attention_value_scale")]:
        if bad:
            raise HFCheckpointError(f"model.{why.split(':')[0]}: Qwen3 on the Hub cannot hold "
                                    "this setting; export this model as an Orbax checkpoint "
                                    "instead (`mopd convert --to orbax`)")
    moe = cfg.is_moe
    c = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "dtype": cfg.param_dtype, "use_cache": True,
    }
    if cfg.layer_types is not None:
        c["layer_types"] = ["sliding_attention" if t == "sliding" else "full_attention"
                            for t in cfg.layer_types]
        c["use_sliding_window"] = True
        c["sliding_window"] = cfg.sliding_window
        c["max_window_layers"] = cfg.num_layers
    if moe:
        c.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size,
                 norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                 mlp_only_layers=list(cfg.mlp_only_layers),
                 router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    return c
