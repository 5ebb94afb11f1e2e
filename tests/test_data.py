"""Prompt data: file formats and their error messages, mixing, determinism, resume, shards,
length policy."""

import collections
import functools
import json

import pytest

from mopd_jax.data.pipeline import PromptPipeline, encode_prompt
from mopd_jax.data.sources import DataError, read_records, write_records
from mopd_jax.sampling.rollout import Prompt
from mopd_jax.tokenizer import CharTokenizer

TOK = CharTokenizer("0123456789+-=abc ?")
ENCODE = functools.partial(encode_prompt, TOK)


# Domains have hundreds of records: grain's index_shuffle costs ~c/n per element (6 ms at n=7).
def _records(domain, n, length=4):
    """``n`` distinct prompts of ``length`` characters (index in base 10, left-padded)."""
    return [{"prompt": str(i).rjust(length, "a"), "domain": domain, "answer": str(i)}
            for i in range(n)]


def _pipeline(records_by_domain, **kw):
    kw = {"encode": ENCODE, "batch_size": 4, "max_prompt_len": 16, **kw}
    return PromptPipeline(records_by_domain, **kw)


def _uids(batches):
    return [[p.metadata["uid"] for p in b] for b in batches]


# ---- files ----

RECORDS = [
    {"prompt": "1+2=?", "domain": "math", "answer": "3", "reward": "exact_match"},
    {"prompt": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "abc?"}], "domain": "chat"},
    {"prompt": "c", "domain": "code", "tests": ["assert f() == 1", "assert g()"]},
]


@pytest.mark.parametrize("ext", [".jsonl", ".parquet", ".array_record", ".arrayrecord"])
def test_round_trip(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    write_records(path, RECORDS)
    assert read_records(path) == RECORDS


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n   \n" + json.dumps(RECORDS[2]) + "\n\n")
    assert read_records(path) == [RECORDS[0], RECORDS[2]]


GOOD = json.dumps(RECORDS[0])


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "1+1", "domain": ', "malformed JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"domain": "math"}', "missing 'prompt'"),
    ('{"prompt": "  ", "domain": "math"}', "empty 'prompt'"),
    ('{"prompt": [], "domain": "math"}', "empty 'prompt' message list"),
    ('{"prompt": 3, "domain": "math"}', "'prompt' is int"),
    ('{"prompt": [{"role": "user"}], "domain": "math"}', "'prompt' message 0"),
    ('{"prompt": "1+1"}', "missing 'domain'"),
    ('{"prompt": "1+1", "domain": ""}', "'domain' is ''"),
    ('{"prompt": "1+1", "domain": 7}', "'domain' is 7"),
    ('{"prompt": "1+1", "domain": "math", "reward": 1}', "'reward' is 1"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:3: {expected}"), str(e.value)


def test_indexed_formats_errors_name_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "bad.parquet"
    write_records(path, [RECORDS[0], {"prompt": "", "domain": "math"}])
    with pytest.raises(DataError, match=r"bad\.parquet: record 1: empty 'prompt'"):
        read_records(path)
    path = tmp_path / "bad.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for blob in [GOOD.encode(), b"{not json", GOOD.encode()]:
        writer.write(blob)
    writer.close()
    with pytest.raises(DataError, match=r"bad\.array_record: record 1: malformed JSON"):
        read_records(path)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,domain\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown extension '\.csv'; use one of \.jsonl"):
        read_records(tmp_path / "d.csv")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(tmp_path / "junk.parquet")


# ---- encoding ----

def test_encode_prompt():
    assert encode_prompt(TOK, {"prompt": "1+2"}) == TOK.encode("1+2")
    chat = {"prompt": [{"role": "system", "content": "a"}, {"role": "user", "content": "1?"}]}
    assert encode_prompt(TOK, chat) == TOK.encode("a\n1?")

    class Templated(CharTokenizer):
        def apply_chat_template(self, messages):
            return "".join(f"{m['role'][0]}={m['content']} " for m in messages)

    assert encode_prompt(Templated(TOK.alphabet), chat) == TOK.encode("s=a u=1? ")


# ---- pipeline ----

def test_batches_are_prompts_with_metadata():
    pipe = _pipeline({"math": _records("math", 5)})
    batch = next(pipe)
    assert len(batch) == 4 and all(isinstance(p, Prompt) for p in batch)
    p = batch[0]
    index = int(p.metadata["uid"].split("/")[1])
    assert p.metadata["uid"] == f"math/{index}" and p.domain == "math"
    assert p.metadata["answer"] == str(index) and p.metadata["prompt"] == _records("math", 5)[
        index]["prompt"]
    assert p.tokens == tuple(TOK.encode(p.metadata["prompt"]))
    assert pipe.domains == ("math",)


def test_epochs_cover_the_data_and_reshuffle():
    pipe = _pipeline({"math": _records("math", 8)})
    epochs = [sum(_uids([next(pipe), next(pipe)]), []) for _ in range(3)]
    assert all(sorted(e) == sorted(f"math/{i}" for i in range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_mixing_proportions():
    weights = {"a": 1.0, "b": 3.0, "c": 0.5}
    pipe = _pipeline({d: _records(d, 300 + i) for i, d in enumerate(weights)},
                     weights=weights, batch_size=9)
    counts = collections.Counter(p.domain for _ in range(100) for p in next(pipe))
    total = sum(counts.values())
    for d, w in weights.items():
        assert counts[d] / total == pytest.approx(w / sum(weights.values()), abs=0.01)


def test_determinism_per_seed():
    data = {"a": _records("a", 200), "b": _records("b", 200)}
    run = lambda seed: _uids(next(_pipeline(data, seed=seed)) for _ in range(10))
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_state_restores_the_next_batches():
    data = {"a": _records("a", 150, length=3),
            "b": _records("b", 100, length=6) + _records("b", 100, length=3)}
    kw = {"weights": {"a": 2.0, "b": 1.0}, "seed": 3, "max_prompt_len": 4, "overflow": "drop"}
    pipe = _pipeline(data, **kw)
    for _ in range(7):
        next(pipe)
    state = pipe.get_state()
    expected = [next(pipe) for _ in range(6)]
    for restored_state in (state, json.loads(json.dumps(state))):
        other = _pipeline(data, **kw)
        next(other)  # a fresh pipeline at a different position is moved, not just started
        other.set_state(restored_state)
        assert other.stats == state["stats"]
        assert [next(other) for _ in range(6)] == expected
        assert other.stats == pipe.stats
    with pytest.raises(DataError, match="saved with different seed"):
        _pipeline(data, **{**kw, "seed": 4}).set_state(state)


def test_shards_are_disjoint_and_cover():
    data = {"a": _records("a", 200), "b": _records("b", 140)}
    seen = []
    for shard in range(3):
        pipe = _pipeline(data, shard_index=shard, shard_count=3, batch_size=2)
        # Equal weights: 68 batches draw 68 of each domain, an epoch of every shard (<= 67).
        seen.append({u for _ in range(68) for u in _uids([next(pipe)])[0]})
    assert all(not (seen[i] & seen[j]) for i in range(3) for j in range(i + 1, 3))
    assert set().union(*seen) == {f"a/{i}" for i in range(200)} | {f"b/{i}" for i in range(140)}
    small = {"a": _records("a", 7)}
    with pytest.raises(DataError, match="domain 'a' has 7 records, too few for shard 7 of 8"):
        _pipeline(small, shard_index=7, shard_count=8)


def test_length_policies():
    # Records 0-5 have 3 characters, 6-9 have 8; max_prompt_len is 5.
    records = _records("m", 6, length=3) + [
        {"prompt": f"abc?{i}={i}+", "domain": "m"} for i in range(6, 10)]
    drop = _pipeline({"m": records}, max_prompt_len=5, overflow="drop", batch_size=6)
    kept = [p for _ in range(5) for p in next(drop)]
    assert {int(p.metadata["uid"].split("/")[1]) for p in kept} == set(range(6))
    s = drop.stats
    assert s["seen"] == s["dropped"] + 30 and s["dropped"] > 0 and s["truncated"] == 0
    assert s["domains"]["m"] == {"seen": s["seen"], "dropped": s["dropped"], "truncated": 0}

    trunc = _pipeline({"m": records}, max_prompt_len=5, overflow="truncate", batch_size=10)
    batch = next(trunc)
    for p in batch:
        full = TOK.encode(p.metadata["prompt"])
        assert p.tokens == tuple(full[-5:])
    assert trunc.stats["truncated"] == 4 and trunc.stats["dropped"] == 0
    assert trunc.stats["seen"] == 10


def test_domain_with_only_too_long_prompts():
    data = {"ok": _records("ok", 4, length=2), "long": _records("long", 3, length=9)}
    pipe = _pipeline(data, max_prompt_len=5, overflow="drop")
    with pytest.raises(DataError, match="every prompt of domain 'long' .* max_prompt_len=5"):
        for _ in range(10):
            next(pipe)


def test_config_errors():
    data = {"a": _records("a", 3), "b": _records("b", 3)}
    with pytest.raises(DataError, match="weights name domain 'c', which has no records"):
        _pipeline(data, weights={"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match="weight 0 for domain 'b'"):
        _pipeline(data, weights={"a": 1, "b": 0})
    with pytest.raises(DataError, match=r"no weight for domain\(s\) \['b'\]"):
        _pipeline(data, weights={"a": 1})
    with pytest.raises(DataError, match="domain 'b' has no records"):
        _pipeline({"a": data["a"], "b": []})
    with pytest.raises(DataError, match="record 0 has domain 'a'"):
        _pipeline({"b": data["a"]})
    with pytest.raises(DataError, match="overflow='cut'"):
        _pipeline(data, overflow="cut")


def test_encode_failure_names_the_record():
    def encode(record):
        if record["answer"] == "2":
            raise KeyError("no such token")
        return ENCODE(record)

    pipe = _pipeline({"a": _records("a", 3)}, encode=encode)
    with pytest.raises(DataError, match="encoding prompt a/2 failed: KeyError"):
        next(pipe)


def test_from_files_groups_by_domain(tmp_path):
    write_records(tmp_path / "one.jsonl", _records("a", 3) + _records("b", 2))
    write_records(tmp_path / "two.array_record", _records("b", 2))
    pipe = PromptPipeline.from_files([tmp_path / "one.jsonl", tmp_path / "two.array_record"],
                                     encode=ENCODE, batch_size=14, max_prompt_len=16)
    assert pipe.domains == ("a", "b")
    uids = _uids([next(pipe)])[0]
    assert set(uids) == {f"a/{i}" for i in range(3)} | {f"b/{i}" for i in range(4)}
