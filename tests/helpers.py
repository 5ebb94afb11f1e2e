"""Shared test builders: tiny random Hugging Face checkpoints written offline, and a tiny
model's train gradient compiled for a libtpu v5p topology."""

from __future__ import annotations

import numpy as np

FP32_LOGPROB_ATOL = 1e-4  # issue tolerance for fp32 log-prob parity with transformers
FP32_ATOL = 1e-5          # same-math fp32 comparisons (sharded vs single, ragged vs dense)


def hf_tiny_config(kind: str, **over):
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=256)
    if kind == "dense":
        common.update(tie_word_embeddings=True)
        common.update(over)
        return transformers.Qwen3Config(**common)
    common.update(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1,
                  tie_word_embeddings=False)
    common.update(over)
    return transformers.Qwen3MoeConfig(**common)


def hf_family_config(kind: str, **over):
    """Tiny configs of the other families: 'mimo' (every MiMo-V2-Flash trait: n_group 4 >
    topk_group 2, scaling 2.5, partial rotary, head_dim 12 != v_head_dim 8, window 3 < the
    rows), 'llama' (Llama 3 rope scaling, untied) and 'qwen2' (q/k/v bias, tied)."""
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256)
    if kind == "mimo":
        common.update(num_key_value_heads=1, head_dim=12, v_head_dim=8,
                      moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=4, topk_group=2, routed_scaling_factor=2.5, sliding_window=3,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                   "full_attention"],
                      mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                      rope_parameters={
                          "full_attention": {"rope_type": "default", "rope_theta": 50000.0,
                                             "partial_rotary_factor": 0.5},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5}})
        common.update(over)
        return transformers.MiMoV2FlashConfig(**common)
    common.update(num_key_value_heads=2, head_dim=8)
    if kind == "llama":
        common.update(tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        common.update(over)
        return transformers.LlamaConfig(**common)
    common.pop("head_dim")
    common.update(tie_word_embeddings=True, rope_theta=10000.0)
    common.update(over)
    return transformers.Qwen2Config(**common)


def write_hf_model(path, kind: str, seed: int = 0, **over):
    """A random HF model saved to ``path``; returns the torch model (eval mode).

    ``kind``: 'dense' / 'moe' (Qwen3 / Qwen3-MoE), 'mimo', 'llama' or 'qwen2'.
    """
    import torch
    import transformers

    classes = {"dense": transformers.Qwen3ForCausalLM, "moe": transformers.Qwen3MoeForCausalLM,
               "mimo": transformers.MiMoV2FlashForCausalLM,
               "llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}
    cfg = (hf_tiny_config(kind, **over) if kind in ("dense", "moe")
           else hf_family_config(kind, **over))
    torch.manual_seed(seed)
    model = classes[kind](cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():  # MiMo: a non-zero expert-choice correction
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def hf_token_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.double()
    logp = torch.log_softmax(logits, -1)[:, :-1]
    return logp.gather(-1, torch.tensor(tokens)[:, 1:, None])[..., 0].numpy()


def v5p_train_grad_hlo(cfg, B: int = 8, T: int = 256):
    """(mesh, HLO text) of the gradient of a tiny model's loss compiled for v5p-8 with libtpu
    (no TPU needed), under the train role's rules; bf16 dots at the default precision (the
    conftest's fp32 'highest' does not lower in Mosaic)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mopd_jax import compile_check as cc
    from mopd_jax import sharding as shd

    mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1),
                         devices=cc.target_devices(cc.parse_topology("v5p-8")))
    graphdef, state = cc.abstract_params(cfg, mesh, "train")
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=shd.batch_sharding(mesh, 2))

    def loss(state, tok):
        with shd.use_rules(mesh, "train"):
            h, _, _ = nnx.merge(graphdef, state)(tok)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    with jax.default_matmul_precision("default"):
        return mesh, jax.jit(jax.grad(loss)).lower(state, tok).compile().as_text()
