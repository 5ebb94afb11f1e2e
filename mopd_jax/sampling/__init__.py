"""Student rollouts on the JetStream Engine protocol: prefill / insert / generate over slots.

Public API:
  SamplingParams, sample_logits          -- sampler.py (what distribution log-probs come from)
  Engine, Prefix, DecodeState, ResultTokens  -- engine.py
  Prompt, RolloutBatch, rollout          -- rollout.py (continuous batching driver)
The JetStream server adapter (``jetstream_adapter``) is imported on demand: it needs the
optional ``jetstream`` extra.
"""

from mopd_jax.sampling.engine import DecodeState, Engine, EngineError, Prefix, ResultTokens
from mopd_jax.sampling.rollout import Prompt, RolloutBatch, rollout
from mopd_jax.sampling.sampler import GREEDY, SamplingParams, sample_logits

__all__ = ["DecodeState", "Engine", "EngineError", "Prefix", "ResultTokens", "GREEDY",
           "Prompt", "RolloutBatch", "rollout", "SamplingParams", "sample_logits"]
