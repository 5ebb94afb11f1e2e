"""Jitted steps: teacher/student scoring and the student train step.

Params are arguments, never captured constants, so one compiled ``score`` serves every teacher
that shares the student's graph.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mopd_jax.chunked import chunked_token_logprobs


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "vocab_chunk",
                                             "seq_chunk"))
def token_logprobs_step(graphdef, params, tokens_BT, *, temperature: float = 1.0,
                        vocab_chunk: int = 8192, seq_chunk: int = 1024):
    """log p(x_t | x_<t) for t >= 1 ([B, T-1]) under softmax(logits / temperature), chunked."""
    model = nnx.merge(graphdef, params)
    hidden, _, _ = model(tokens_BT)
    return chunked_token_logprobs(hidden[:, :-1], model.lm_head_weight(), tokens_BT[:, 1:],
                                  temperature=temperature, vocab_chunk=vocab_chunk,
                                  seq_chunk=seq_chunk)
