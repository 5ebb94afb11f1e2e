"""Shared test builders: tiny random Hugging Face checkpoints written offline."""

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


def write_hf_model(path, kind: str, seed: int = 0, **over):
    """A random HF model saved to ``path``; returns the torch model (eval mode)."""
    import torch
    import transformers

    cfg = hf_tiny_config(kind, **over)
    torch.manual_seed(seed)
    cls = transformers.Qwen3ForCausalLM if kind == "dense" else transformers.Qwen3MoeForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def hf_token_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.double()
    logp = torch.log_softmax(logits, -1)[:, :-1]
    return logp.gather(-1, torch.tensor(tokens)[:, 1:, None])[..., 0].numpy()
