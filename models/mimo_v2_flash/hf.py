"""MiMo-V2-Flash config.json and weights, as transformers 5.23 defines them.

Hub layout: per-expert keys (``mlp.experts.{e}.gate_proj.weight``; the fused
``gate_up_proj`` that transformers holds in memory loads too), sinks as
``self_attn.attention_sink_bias`` (``self_attn.sinks`` also read), the router's
``e_score_correction_bias``. The multi-token-prediction head (``model.mtp.*``) is skipped.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import HFCheckpointError, RequiredFields, decoder_table, hf_dtype, hf_layer_types

MODEL_TYPES = ("mimo_v2_flash",)
ARCHITECTURES = ("MiMoV2FlashForCausalLM",)
SKIPPED_PREFIXES = ("model.mtp.",)
_KINDS = {"full": "full_attention", "sliding": "sliding_attention"}


def param_table(cfg: ModelConfig):
    return decoder_table(cfg, sink_key="self_attn.attention_sink_bias",
                         sink_alternatives=("self_attn.sinks",))


def _rope(c: RequiredFields) -> dict:
    """{kind: (theta, partial_rotary_factor)} from the per-layer-kind ``rope_parameters``."""
    rp = c.get("rope_parameters") or {
        "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0,
                           "partial_rotary_factor": 0.334},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0,
                              "partial_rotary_factor": 0.334}}
    out = {}
    for ours, theirs in _KINDS.items():
        p = rp.get(theirs)
        if p is None:
            continue
        if p.get("rope_type", "default") != "default":
            c.fail(f"rope_parameters.{theirs}.rope_type {p.get('rope_type')!r} is not "
                   "supported; only default RoPE")
        out[ours] = (float(p["rope_theta"]), float(p.get("partial_rotary_factor", 0.334)))
    if len({f for _, f in out.values()}) > 1:
        c.fail("rope_parameters: different partial_rotary_factor per layer kind is not "
               "supported")
    return out


def config_kwargs(c: RequiredFields) -> dict:
    if c.get("hidden_act", "silu") != "silu":
        c.fail(f"hidden_act {c['hidden_act']!r} is not supported; only silu")
    n = c["num_hidden_layers"]
    layer_types = hf_layer_types(c, n) or tuple(
        "full" if i == 0 or (i + 1) % 6 == 0 else "sliding" for i in range(n))
    mlp_types = c.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    window = c.get("sliding_window", 129)
    if c.get("sliding_window_size") is not None:  # SGLang's spelling: the window excludes the query
        window = c["sliding_window_size"] + 1
    rope = _rope(c)
    full = rope.get("full", next(iter(rope.values())))
    K = c["num_key_value_heads"]
    dtype = hf_dtype(c)
    scale = c.get("attention_value_scale", 0.707)
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=n,
        num_heads=c["num_attention_heads"], num_kv_heads=K, sliding_num_kv_heads=2 * K,
        head_dim=c.get("head_dim", 192), v_head_dim=c.get("v_head_dim", 128),
        attention_bias=bool(c.get("attention_bias", False)),
        attention_value_scale=1.0 if scale is None else float(scale),
        rope_theta=full[0], sliding_rope_theta=rope.get("sliding", full)[0],
        partial_rotary_factor=full[1], rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=c.get("max_position_embeddings", 131_072),
        qk_norm=False, layer_types=layer_types, sliding_window=window,
        attention_sink="sliding",
        num_experts=c.get("n_routed_experts", c.get("num_local_experts", 256)),
        num_experts_per_tok=c.get("num_experts_per_tok", 8),
        moe_intermediate_size=c.get("moe_intermediate_size", 2048),
        mlp_only_layers=tuple(i for i, t in enumerate(mlp_types) if t == "dense"),
        router="sigmoid", n_group=c.get("n_group", 1), topk_group=c.get("topk_group", 1),
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
        dtype=dtype, param_dtype=dtype)


def hf_config(cfg: ModelConfig) -> dict:
    """A ``config.json`` that transformers loads as ``MiMoV2FlashForCausalLM``."""
    lt = cfg.layer_types or ("full",) * cfg.num_layers
    for ok, field, why in [
            (cfg.sliding_num_kv_heads in (None, 2 * cfg.num_kv_heads) or "sliding" not in lt,
             "sliding_num_kv_heads", "transformers gives sliding layers 2 x num_kv_heads"),
            (cfg.attention_sink == "sliding" or "sliding" not in lt, "attention_sink",
             "transformers puts sinks on the sliding layers, and only there"),
            (not cfg.qk_norm, "qk_norm", "MiMo-V2-Flash has no QK-norm"),
            (not cfg.is_moe or cfg.router == "sigmoid", "router",
             "MiMo-V2-Flash routes with sigmoid scores"),
            (not cfg.is_moe or cfg.decoder_sparse_step == 1, "decoder_sparse_step",
             "MiMo-V2-Flash marks dense layers with mlp_layer_types")]:
        if not ok:
            raise HFCheckpointError(f"model.{field}: {why}; this config cannot be exported as "
                                    "MiMo-V2-Flash (use `mopd convert --to orbax`)")
    theta_s = cfg.sliding_rope_theta or cfg.rope_theta
    rope = {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                               "partial_rotary_factor": cfg.partial_rotary_factor},
            "sliding_attention": {"rope_type": "default", "rope_theta": theta_s,
                                  "partial_rotary_factor": cfg.partial_rotary_factor}}
    return {
        "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "v_head_dim": cfg.value_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "attention_value_scale": cfg.attention_value_scale, "attention_dropout": 0.0,
        "layer_types": [_KINDS[t] for t in lt], "sliding_window": cfg.sliding_window or 129,
        "mlp_layer_types": ["sparse" if cfg.is_moe_layer(i) else "dense"
                            for i in range(cfg.num_layers)],
        "n_routed_experts": cfg.num_experts or 1,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size, "n_group": cfg.n_group,
        "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor, "dtype": cfg.param_dtype,
        "use_cache": True, "output_router_logits": False,
    }
