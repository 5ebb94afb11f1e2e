"""Serve the rollout engine with JetStream's own orchestrator and gRPC server (extra ``jetstream``).

``JetStreamEngine(engine, params)`` implements ``jetstream.engine.engine_api.Engine`` of the
last published JetStream (``google-jetstream==0.2.2``), so ``jetstream.core.orchestrator.Driver``
and ``jetstream.core.server_lib.JetStreamServer`` drive it unchanged; ``serve`` starts both.

Install without TensorFlow (``google-jetstream`` declares ``seqio``, a 3 GB environment):

    pip install -e '.[jetstream]'                      # grpcio, prometheus-client, shortuuid, tiktoken
    pip install --no-deps google-jetstream==0.2.2

Compatibility shims, all confined to this module and applied by ``import_jetstream()``:

1. ``seqio``: ``jetstream.engine.token_utils`` imports ``seqio.vocabularies`` at import time,
   only to name its SentencePiece tokenizer. When seqio is not installed an inert stub module
   is registered first; nothing here uses SentencePiece (the adapter brings its tokenizer).
2. ``jax.tree_map``: the orchestrator's ``delete_pytree`` calls ``jax.tree_map``, which current
   JAX removed; the generate thread would raise and ``JetThread`` SIGKILLs the process. The
   adapter rebinds ``orchestrator.delete_pytree`` to the same function on ``jax.tree.map``
   (it patches that module attribute only, never ``jax`` itself).
3. First token: our engine has the JetStream 0.3 shape (prefill samples the first token), but
   0.2.2's orchestrator drops everything prefill returns except the prefix and only streams
   ``generate`` results. The adapter therefore emits each slot's tokens one step late:
   ``generate`` reports the token that was pending before the step (the first one comes out of
   the first step after ``insert``). The token sequence is the engine's own, unchanged.
4. BOS: 0.2.2 prepends ``tokenizer.bos_id`` to every fresh request. Qwen3 has no BOS, so with
   ``strip_bos=True`` (default) prefill drops that first token again.

Limits of 0.2.2's API: requests carry no sampling settings (one ``SamplingParams`` per adapter,
greedy by default; request seeds count up), ``ResultTokens`` has no log-prob column, and
``max_prefill_length`` must be one of JetStream's buckets (a power of two >= 16).

Calling ``LLMOrchestrator.Decode`` in-process: keep the event loop open until ``driver.stop()``
has returned (no ``asyncio.run`` around the requests alone). 0.2.2's detokenize thread ends a
stream with two ``call_soon_threadsafe`` calls; a loop closed between them makes the thread raise
and ``JetThread`` SIGKILLs the process. The gRPC server owns a long-lived loop and is unaffected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mopd_jax.sampling.engine import DecodeState, Engine, Prefix
from mopd_jax.sampling.sampler import GREEDY, SamplingParams

_JETSTREAM_BUCKETS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def _stub_seqio() -> None:
    if "seqio" in sys.modules or importlib.util.find_spec("seqio") is not None:
        return
    seqio = types.ModuleType("seqio")
    vocabularies = types.ModuleType("seqio.vocabularies")

    class Vocabulary:  # names only; JetStream builds these only for SentencePiece models
        def __init__(self, *args, **kwargs):
            raise ImportError("seqio is stubbed by mopd_jax (no TensorFlow); SentencePiece "
                              "tokenizers are unavailable; pass a tokenizer to the adapter")

    class SentencePieceVocabulary(Vocabulary):
        pass

    vocabularies.Vocabulary = Vocabulary
    vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
    seqio.vocabularies = vocabularies
    sys.modules["seqio"] = seqio
    sys.modules["seqio.vocabularies"] = vocabularies


def import_jetstream():
    """Import JetStream 0.2.2 with the shims of the module docstring; returns its modules."""
    try:
        _stub_seqio()
        from jetstream.core import orchestrator, server_lib
        from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
        from jetstream.engine import engine_api, tokenizer_api, tokenizer_pb2
    except ImportError as e:
        raise ImportError(
            f"JetStream is not importable ({e}). Install the extra: pip install -e "
            "'.[jetstream]' && pip install --no-deps google-jetstream==0.2.2") from e

    def delete_pytree(p):  # orchestrator.delete_pytree, on jax.tree.map
        def delete_leaf(leaf):
            if isinstance(leaf, jax.Array):
                leaf.delete()

        jax.tree.map(delete_leaf, p)

    orchestrator.delete_pytree = delete_pytree
    return types.SimpleNamespace(orchestrator=orchestrator, server_lib=server_lib,
                                 jetstream_pb2=jetstream_pb2,
                                 jetstream_pb2_grpc=jetstream_pb2_grpc, engine_api=engine_api,
                                 tokenizer_api=tokenizer_api, tokenizer_pb2=tokenizer_pb2)


@struct.dataclass
class AdapterState:
    """The engine's decode state plus one-step-late emission bookkeeping (shim 3)."""

    inner: DecodeState
    pending: jax.Array  # [S] bool: inner.tokens holds a real token not yet emitted
    emitted: jax.Array  # [S] int32: tokens emitted so far (JetStream's "lengths")


def _make_tokenizer_class(js):
    class Tokenizer(js.tokenizer_api.Tokenizer):
        """JetStream tokenizer over a mopd tokenizer (``encode``/``decode``) or bare ids."""

        def __init__(self, inner, stop_tokens, bos_id, pad_id):
            self.inner, self._stop, self._bos, self._pad = inner, set(stop_tokens), bos_id, pad_id

        def encode(self, s, **kwargs):
            if self.inner is None:
                raise ValueError("this JetStream engine has no tokenizer; send token_content")
            from jetstream.engine import token_utils
            return token_utils.pad_tokens(
                np.asarray(self.inner.encode(s), np.int32), self.bos_id, self.pad_id,
                is_bos=kwargs.get("is_bos", True),
                max_prefill_length=kwargs.get("max_prefill_length"),
                jax_padding=kwargs.get("jax_padding", True))

        def decode(self, token_ids, **kwargs):
            return "" if self.inner is None else self.inner.decode(list(token_ids))

        @property
        def pad_id(self):
            return self._pad

        @property
        def eos_id(self):
            return min(self._stop) if self._stop else -1

        @property
        def bos_id(self):
            return self._bos

        @property
        def stop_tokens(self):
            return self._stop

    return Tokenizer


def JetStreamEngine(engine: Engine, params, *, tokenizer=None,
                    sampling: SamplingParams = GREEDY, strip_bos: bool = True,
                    bos_id: int = 0):
    """A ``jetstream.engine.engine_api.Engine`` serving ``engine`` with ``params``.

    (A factory, so that importing this module does not need JetStream.) ``tokenizer`` is a
    mopd tokenizer or None (then requests must send token ids).
    """
    js = import_jetstream()
    return _adapter_class(js)(engine, params, tokenizer=tokenizer, sampling=sampling,
                              strip_bos=strip_bos, bos_id=bos_id)


_CLASSES: dict = {}


def _adapter_class(js):
    if "adapter" in _CLASSES:
        return _CLASSES["adapter"]
    Tokenizer = _make_tokenizer_class(js)

    class _JetStreamEngine(js.engine_api.Engine):
        def __init__(self, engine: Engine, params, *, tokenizer, sampling, strip_bos, bos_id):
            if engine.max_prefill_length not in _JETSTREAM_BUCKETS:
                raise ValueError(f"engine.max_prefill_length={engine.max_prefill_length}: "
                                 "JetStream 0.2.2 needs one of its buckets "
                                 f"{_JETSTREAM_BUCKETS}")
            self.engine, self.params = engine, engine.shard_params(params)
            self.sampling, self.strip_bos, self._bos = sampling, strip_bos, bos_id
            self._tokenizer = tokenizer
            self._requests = 0
            self._insert = jax.jit(self._insert_fn, donate_argnums=(1,))
            self._generate = jax.jit(self._generate_fn, donate_argnums=(1,))

        # ---------------------------------------------------------------- accelerator calls
        def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length) -> Prefix:
            tokens = np.asarray(padded_tokens)[:true_length]
            if self.strip_bos and len(tokens) > 1:
                tokens = tokens[1:]
            padded, length = self.engine.pad_tokens(tokens)
            sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + self._requests)
            self._requests += 1
            prefix, _ = self.engine.prefill(params, padded, length, sampling=sampling,
                                            existing_prefix=existing_prefix)
            return prefix

        def insert(self, prefix: Prefix, decode_state: AdapterState, slot: int) -> AdapterState:
            return self._insert(prefix, decode_state, np.int32(slot))

        def generate(self, params, decode_state: AdapterState):
            return self._generate(params, decode_state)

        def init_decode_state(self, *args, **kwargs) -> AdapterState:
            S = self.engine.max_concurrent_decodes
            return AdapterState(inner=self.engine.init_decode_state(),
                                pending=jnp.zeros((S,), bool), emitted=jnp.zeros((S,), jnp.int32))

        def _insert_fn(self, prefix, state: AdapterState, slot):
            inner = self.engine._insert_fn(prefix, state.inner, slot[None])
            return AdapterState(inner=inner, pending=state.pending.at[slot].set(True),
                                emitted=state.emitted.at[slot].set(0))

        def _generate_fn(self, params, state: AdapterState):
            out_tokens, valid = state.inner.tokens, state.pending
            inner, res = self.engine._generate_fn(params, state.inner)
            emitted = state.emitted + valid.astype(jnp.int32)
            data = jnp.stack([out_tokens, valid.astype(jnp.int32), emitted], axis=1)
            result = js.engine_api.ResultTokens(data=data, tokens_idx=(0, 1), valid_idx=(1, 2),
                                                length_idx=(2, 3), samples_per_slot=1)
            return AdapterState(inner=inner, pending=res.valid, emitted=emitted), result

        # ---------------------------------------------------------------- host-side API
        def load_params(self, *args, **kwargs):
            return self.params

        def get_prefix_destination_sharding(self) -> Any:
            return None  # interleaved serving: the prefix stays where prefill put it

        def get_tokenizer(self):
            return js.tokenizer_pb2.TokenizerParameters(path="mopd_jax", extra_ids=0)

        def build_tokenizer(self, metadata):
            return Tokenizer(self._tokenizer, self.engine.stop_tokens, self._bos,
                             self.engine.pad_id)

        @property
        def max_concurrent_decodes(self) -> int:
            return self.engine.max_concurrent_decodes

        @property
        def samples_per_slot(self) -> int:
            return 1

        @property
        def max_prefill_length(self) -> int:
            return self.engine.max_prefill_length

        @property
        def mesh(self):
            return self.engine.mesh

        @property
        def colocated_cpus(self):
            return None

    _CLASSES["adapter"] = _JetStreamEngine
    return _JetStreamEngine


def make_driver(adapter):
    """JetStream's orchestrator Driver running ``adapter`` for prefill and generate."""
    js = import_jetstream()
    return js.orchestrator.Driver(prefill_engines=[adapter], generate_engines=[adapter],
                                  prefill_params=[adapter.params],
                                  generate_params=[adapter.params], interleaved_mode=True)


def serve(adapter, port: int, threads: int | None = None):
    """Start JetStream's gRPC server on ``port``; returns the server (``.stop()`` to end)."""
    js = import_jetstream()
    import grpc
    driver = make_driver(adapter)
    server = js.server_lib.JetStreamServer(
        driver, threads or max(driver.get_total_concurrent_requests(), 8), port,
        grpc.insecure_server_credentials())
    server.start()
    return server
