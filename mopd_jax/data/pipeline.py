"""Prompt pipeline: per-domain shard -> shuffle -> repeat, mixed by weight, tokenised by grain.

For each domain, this host takes records ``shard_index::shard_count`` (disjoint across hosts),
shuffles them with a seed derived from ``(seed, domain)`` (a new order each epoch) and repeats
forever; ``grain.MapDataset.mix`` interleaves the domains deterministically in proportion to
their weights, and a grain map runs ``encode`` in prefetch threads. The host side then applies
the length policy, counts it in ``stats`` and groups prompts into batches, so ``get_state``
(grain's position plus the counters) restores exactly the batches that would come next.

    pipeline = PromptPipeline.from_files(["math.jsonl", "code.parquet"],
                                         encode=functools.partial(encode_prompt, tokenizer),
                                         batch_size=32, max_prompt_len=1024)
    batch = next(pipeline)            # list[Prompt], len 32
    state = pipeline.get_state()      # JSON-serialisable; pipeline.set_state(state) resumes
"""

from __future__ import annotations

import copy
import math
import os
import zlib
from typing import Any, Callable, Sequence

import grain

from mopd_jax.data.sources import DataError, read_records, validate_record
from mopd_jax.sampling.rollout import Prompt

# Encoding is cheap next to sampling; a few threads keep ahead without crowding the host.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)
_STATE_VERSION = 1


def encode_prompt(tokenizer, record: dict) -> list[int]:
    """Token ids of ``record['prompt']``: plain text, or chat messages via the chat template.

    Messages go through ``tokenizer.apply_chat_template`` when the tokenizer has one (a rendered
    string is then encoded; token ids are used as they are), else their contents joined by
    newlines are encoded.
    """
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    has_template = (hasattr(tokenizer, "apply_chat_template")
                    and getattr(tokenizer, "chat_template", True))
    if not has_template:
        return list(tokenizer.encode("\n".join(m["content"] for m in prompt)))
    rendered = tokenizer.apply_chat_template(prompt)
    return list(tokenizer.encode(rendered) if isinstance(rendered, str) else rendered)


class PromptPipeline:
    """An endless, resumable iterator of ``list[Prompt]`` batches mixed across domains.

    ``overflow`` decides what happens to prompts longer than ``max_prompt_len`` tokens: "drop"
    skips them, "truncate" keeps their last ``max_prompt_len`` tokens (the question sits at the
    end). ``stats`` counts ``seen``/``dropped``/``truncated`` prompts, overall and per domain.
    """

    def __init__(self, records_by_domain: dict[str, list[dict]], *,
                 encode: Callable[[dict], Sequence[int]], batch_size: int,
                 weights: dict[str, float] | None = None, seed: int = 0,
                 max_prompt_len: int, overflow: str = "drop",
                 shard_index: int = 0, shard_count: int = 1):
        _check_args(batch_size, max_prompt_len, overflow, shard_index, shard_count)
        self._records = _check_records(records_by_domain)
        self._weights = _check_weights(weights, self._records)
        self.batch_size, self.max_prompt_len, self.overflow = batch_size, max_prompt_len, overflow
        self._shard_sizes = {}
        datasets = []
        for domain, records in self._records.items():
            size = len(range(shard_index, len(records), shard_count))
            if size == 0:
                raise DataError(f"domain {domain!r} has {len(records)} records, too few for "
                                f"shard {shard_index} of {shard_count}; add records or use "
                                "fewer shards")
            self._shard_sizes[domain] = size
            ds = (grain.MapDataset.range(len(records))[shard_index::shard_count]
                  .shuffle(seed=zlib.crc32(f"{seed}/{domain}".encode()))
                  .repeat())
            datasets.append(ds.map(_Encode(domain, records, encode)))
        mixed = grain.MapDataset.mix(datasets, [self._weights[d] for d in self._records])
        self._iterator = mixed.to_iter_dataset(_READ_OPTIONS).__iter__()
        # What fixes the element order; a saved state only resumes a pipeline that matches.
        self._config = {"domains": list(self._records), "seed": seed,
                        "weights": [self._weights[d] for d in self._records],
                        "sizes": [len(r) for r in self._records.values()],
                        "shard_index": shard_index, "shard_count": shard_count}
        self._stats = _zero_stats(self._records)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], **kw) -> "PromptPipeline":
        """A pipeline over the records of ``paths``, grouped by their ``domain`` field."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        by_domain: dict[str, list[dict]] = {}
        for path in paths:
            for record in read_records(path):
                by_domain.setdefault(record["domain"], []).append(record)
        if not by_domain:
            raise DataError(f"no records in {[str(p) for p in paths]}; give non-empty files")
        return cls(by_domain, **kw)

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names, in mixing order."""
        return tuple(self._records)

    @property
    def stats(self) -> dict[str, Any]:
        """A copy of the ``seen``/``dropped``/``truncated`` counters (``domains`` per domain)."""
        return copy.deepcopy(self._stats)

    def __iter__(self) -> "PromptPipeline":
        return self

    def __next__(self) -> list[Prompt]:
        return self.take(self.batch_size)

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts of the stream (``next`` takes ``batch_size``); GRPO's dynamic
        sampling draws only as many as it is missing."""
        batch = []
        while len(batch) < n:
            prompt = self._next_prompt()
            if prompt is not None:
                batch.append(prompt)
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position after the last yielded batch, with the counters; JSON-serialisable."""
        return {"version": _STATE_VERSION, "config": copy.deepcopy(self._config),
                "grain": self._iterator.get_state(), "stats": self.stats}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from ``get_state()`` of a pipeline with the same data, weights, seed, shard."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise DataError("not a PromptPipeline state (or one from another version); pass "
                            "what get_state() returned")
        differ = [k for k in self._config if state["config"].get(k) != self._config[k]]
        if differ:
            raise DataError(f"pipeline state was saved with different {', '.join(differ)}; "
                            "resume with the same data, weights, seed and shard, or start fresh")
        self._iterator.set_state(state["grain"])
        self._stats = copy.deepcopy(state["stats"])

    def _next_prompt(self) -> Prompt | None:
        """The next stream element after the length policy, or None when it was dropped."""
        domain, index, tokens = next(self._iterator)
        if isinstance(tokens, Exception):
            raise DataError(f"encoding prompt {domain}/{index} failed: {tokens!r}; fix the "
                            "record or the encode function") from tokens
        counts = self._stats["domains"][domain]
        self._count(domain, "seen")
        if len(tokens) > self.max_prompt_len:
            if self.overflow == "drop":
                self._count(domain, "dropped")
                if counts["dropped"] == counts["seen"] >= self._shard_sizes[domain]:
                    raise DataError(
                        f"every prompt of domain {domain!r} in this shard is longer than "
                        f"max_prompt_len={self.max_prompt_len}; raise max_prompt_len or use "
                        "overflow='truncate'")
                return None
            tokens = tokens[-self.max_prompt_len:]
            self._count(domain, "truncated")
        record = self._records[domain][index]
        return Prompt(tokens=tokens, domain=record["domain"],
                      metadata={**record, "uid": f"{domain}/{index}"})

    def _count(self, domain: str, key: str) -> None:
        self._stats[key] += 1
        self._stats["domains"][domain][key] += 1


class _Encode:
    """Grain map: record index -> ``(domain, index, tokens)``; a failure travels as the value.

    Raising inside grain's prefetch threads would surface as a grain traceback, so the
    exception is handed to the host loop, which raises a ``DataError`` naming the record.
    """

    def __init__(self, domain: str, records: list[dict], encode: Callable):
        self.domain, self.records, self.encode = domain, records, encode

    def __call__(self, index: int) -> tuple[str, int, tuple[int, ...] | Exception]:
        try:
            tokens = tuple(int(t) for t in self.encode(self.records[index]))
            if not tokens:
                raise ValueError("the prompt encodes to no tokens")
        except Exception as e:  # noqa: BLE001 - reported with the record's id by the host loop
            return self.domain, index, e
        return self.domain, index, tokens


def _check_args(batch_size, max_prompt_len, overflow, shard_index, shard_count) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}; it must be at least 1")
    if max_prompt_len < 1:
        raise DataError(f"max_prompt_len={max_prompt_len}; it must be at least 1")
    if overflow not in ("drop", "truncate"):
        raise DataError(f"overflow={overflow!r}; use 'drop' or 'truncate'")
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index} with shard_count={shard_count}; need "
                        "0 <= shard_index < shard_count")


def _check_records(records_by_domain: dict[str, list[dict]]) -> dict[str, list[dict]]:
    if not records_by_domain:
        raise DataError("no domains given; pass {domain: [records]} with at least one domain")
    for domain, records in records_by_domain.items():
        if not records:
            raise DataError(f"domain {domain!r} has no records; add some or leave it out")
        for i, record in enumerate(records):
            validate_record(record, f"domain {domain!r}: record {i}")
            if record["domain"] != domain:
                raise DataError(f"domain {domain!r}: record {i} has domain "
                                f"{record['domain']!r}; group records by their 'domain' field "
                                "(from_files does)")
    return dict(records_by_domain)


def _check_weights(weights: dict[str, float] | None, records: dict) -> dict[str, float]:
    if weights is None:
        return {d: 1.0 for d in records}
    for domain, w in weights.items():
        if domain not in records:
            raise DataError(f"weights name domain {domain!r}, which has no records; the "
                            f"domains are {sorted(records)}")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise DataError(f"weight {w!r} for domain {domain!r}; weights must be positive "
                            "numbers (leave a domain out of the data to skip it)")
    missing = [d for d in records if d not in weights]
    if missing:
        raise DataError(f"weights give no weight for domain(s) {missing}; weight every domain")
    return {d: float(weights[d]) for d in records}


def _zero_stats(records: dict) -> dict[str, Any]:
    zero = {"seen": 0, "dropped": 0, "truncated": 0}
    return {**zero, "domains": {d: dict(zero) for d in records}}
