"""Rollout store (append/read/resume, safe concurrent reads), metrics log and `inspect_run`."""

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import inspect_run as inspect_mod
from mopd_jax.inspect_run import inspect_run
from mopd_jax.metrics import MetricsWriter, format_config, per_domain, read_metrics
from mopd_jax.rollout_store import RolloutStore, StoreError

MAX_LEN = 8


def _batch(step, B=3, L=6, domains=("math", "code", "math"), seed=0):
    """A fake step's rollouts: prompt of 2 tokens, response up to L."""
    rng = np.random.default_rng(seed + 100 * step)
    length = rng.integers(3, L + 1, B)
    return dict(
        step=step,
        tokens=rng.integers(1, 50, (B, L)).astype(np.int32),
        prompt_len=np.full(B, 2),
        length=length,
        sampler_logp=-rng.random((B, L)).astype(np.float32),
        teacher_logp=-rng.random((B, L)).astype(np.float32),
        reward=rng.random(B).astype(np.float32),
        domains=list(domains[:B]),
    )


def _check_rows(got, batches, max_len=MAX_LEN):
    """``got`` (a read) equals the batches' rows, padded/truncated to max_len."""
    exp_tokens = np.concatenate([
        np.pad(b["tokens"], ((0, 0), (0, max(0, max_len - b["tokens"].shape[1]))))[:, :max_len]
        for b in batches])
    np.testing.assert_array_equal(got["tokens"], exp_tokens)
    np.testing.assert_array_equal(got["step"],
                                  np.concatenate([[b["step"]] * len(b["reward"]) for b in batches]))
    np.testing.assert_array_equal(got["length"],
                                  np.minimum(np.concatenate([b["length"] for b in batches]),
                                             max_len))
    np.testing.assert_array_equal(got["reward"], np.concatenate([b["reward"] for b in batches]))
    assert got["domain"].tolist() == sum((b["domains"] for b in batches), [])


def test_append_read_round_trip(tmp_path):
    store = RolloutStore(tmp_path / "r", max_len=MAX_LEN)
    short, long = _batch(0, L=5), _batch(1, L=11, domains=("chat", "math", "code"))
    store.append(**short)
    store.append(**long)

    got = RolloutStore.open(tmp_path / "r").read()
    _check_rows(got, [short, long])
    assert got["tokens"].dtype == np.int32 and got["sampler_logp"].dtype == np.float32
    # Padding: NaN teacher log-probs and 0 sampler log-probs beyond the given width.
    assert np.isnan(got["teacher_logp"][:3, 5:]).all()
    np.testing.assert_array_equal(got["sampler_logp"][:3, 5:], 0)
    np.testing.assert_array_equal(got["teacher_logp"][3:], long["teacher_logp"][:, :MAX_LEN])
    np.testing.assert_array_equal(store.steps(), [0, 1])
    assert store.domains == ["math", "code", "chat"]
    # Slices, and defaults for absent teacher / reward / domains.
    np.testing.assert_array_equal(store.read(2, 4)["tokens"], got["tokens"][2:4])
    part = store.read(4, columns=("reward", "domain"))
    assert set(part) == {"reward", "domain"} and part["domain"].tolist() == ["math", "code"]
    with pytest.raises(StoreError, match="unknown columns"):
        store.read(columns=("domain_id",))
    store.append(2, np.ones((1, 3)), [1], [3], np.zeros((1, 3)))
    last = store.read(6)
    assert math.isnan(last["reward"][0]) and np.isnan(last["teacher_logp"]).all()
    assert last["domain"].tolist() == ["default"]


def test_reader_sees_only_published_rows(tmp_path):
    writer = RolloutStore(tmp_path / "r", max_len=MAX_LEN)
    first = _batch(0)
    writer.append(**first)
    reader = RolloutStore.open(tmp_path / "r")
    assert reader.num_rows == 3

    # The writer has written the next rows' data (growing the arrays) but not yet published
    # the count, as in the middle of an append or after a crash at that point.
    writer._write_rows(3, {"tokens": np.full((4, MAX_LEN), 7, np.int32),
                           "step": np.full(4, 1, np.int32)})
    assert reader.num_rows == 3
    _check_rows(reader.read(), [first])
    assert len(reader.read(0, 100)["step"]) == 3

    second = _batch(1)
    writer.append(**second)  # overwrites the unpublished rows, then publishes
    assert reader.num_rows == 6
    _check_rows(reader.read(), [first, second])
    with pytest.raises(StoreError, match="read-only"):
        reader.append(**second)


def test_reopen_after_crash_continues(tmp_path):
    path = tmp_path / "r"
    a, b = _batch(0), _batch(1, B=2)
    w = RolloutStore(path, max_len=MAX_LEN)
    w.append(**a)
    w._write_rows(3, {"tokens": np.full((5, MAX_LEN), 9, np.int32)})  # crashed mid-append
    del w

    w = RolloutStore(path, max_len=MAX_LEN)  # mode "a": continue after the published rows
    assert w.num_rows == 3
    w.append(**b)
    _check_rows(RolloutStore.open(path).read(), [a, b])
    with pytest.raises(StoreError, match="max_len=8"):
        RolloutStore(path, max_len=16)
    # mode "w" starts afresh.
    assert RolloutStore(path, max_len=4, mode="w").num_rows == 0
    assert RolloutStore.open(path).max_len == 4


def test_truncate_to_step(tmp_path):
    store = RolloutStore(tmp_path / "r", max_len=MAX_LEN)
    batches = [_batch(s) for s in range(4)]
    for b in batches:
        store.append(**b)
    with pytest.raises(StoreError, match="truncate_to_step"):
        store.append(**_batch(2))  # a resumed run must truncate first

    assert store.truncate_to_step(1) == 6
    np.testing.assert_array_equal(store.steps(), [0, 1])
    redo = _batch(2, seed=7)
    store.append(**redo)
    _check_rows(RolloutStore.open(tmp_path / "r").read(), batches[:2] + [redo])
    assert store.truncate_to_step(-1) == 0 and RolloutStore.open(tmp_path / "r").num_rows == 0


def test_missing_and_corrupt_store(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path / "nope")):
        RolloutStore.open(tmp_path / "nope")
    path = tmp_path / "r"
    RolloutStore(path, max_len=MAX_LEN).append(**_batch(0))
    (path / "meta.json").write_text('{"version": 1, "num_ro')
    with pytest.raises(StoreError, match=f"{path}.*corrupt meta.json"):
        RolloutStore.open(path)
    (path / "meta.json").write_text('{"version": 1, "max_len": 8}')
    with pytest.raises(StoreError, match="corrupt meta.json"):
        RolloutStore.open(path)
    (path / "meta.json").write_text(json.dumps(
        {"version": 1, "max_len": 8, "num_rows": 99, "last_step": 0, "domains": ["math"]}))
    with pytest.raises(StoreError, match="publishes 99"):
        RolloutStore.open(path).read()


def _tb_scalars(tb_dir):
    """(tag, step, value) of every scalar in the TFRecord event files under ``tb_dir``."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out = []
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {tb_dir}"
    for f in files:
        buf, pos = f.read_bytes(), 0
        while pos < len(buf):
            header = buf[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", buf[pos + 8:pos + 12])[0] == masked(header)
            data = buf[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", buf[pos + 12 + n:pos + 16 + n])[0] == masked(data)
            pos += 16 + n
            event = event_pb2.Event.FromString(data)
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_metrics_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(0, {"mopd/kl/math": 0.5, "loss": np.float32(2.0), "lr": jnp.asarray(1e-3)})
        w.write(1, {"mopd/kl/math": float("nan"), "loss": np.inf, "lr": np.array([2e-3])})
        with pytest.raises(ValueError, match="per_domain"):
            w.write(2, {"kl/domain": np.zeros(3)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 1, "mopd/kl/math": None, "loss": None, "lr": 2e-3}
    recs = read_metrics(tmp_path)
    assert recs[0] == {"step": 0, "mopd/kl/math": 0.5, "loss": 2.0,
                       "lr": pytest.approx(1e-3)}
    assert math.isnan(recs[1]["loss"]) and len(recs) == 2

    from mopd_jax.metrics import tensorboard_available
    if not tensorboard_available():  # the base install (CI's 3.12/3.13 smoke): no tb/, and
        assert not (tmp_path / "tb").exists()  # asking for it names the extra
        with pytest.raises(ImportError, match="tensorboardX"):
            MetricsWriter(tmp_path / "forced", tensorboard=True)
        return
    scalars = _tb_scalars(tmp_path / "tb")  # the test extra installs tensorboardX
    assert ("mopd/kl/math", 0, 0.5) in scalars
    assert ("loss", 0, 2.0) in scalars


def test_metrics_resume_matches_uninterrupted(tmp_path):
    def log(w, steps):
        for s in steps:
            w.write(s, {"loss": 1.0 / (s + 1), "kl/math": s * 0.1})

    with MetricsWriter(tmp_path / "full", tensorboard=False) as w:
        log(w, range(6))
    with MetricsWriter(tmp_path / "resumed", tensorboard=False) as w:
        log(w, range(5))  # killed after step 4; the checkpoint is from step 2
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and mid-way through a line
    with MetricsWriter(tmp_path / "resumed", tensorboard=False, resume_step=2) as w:
        assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [0, 1, 2]
        log(w, range(3, 6))
    assert ((tmp_path / "resumed" / "metrics.jsonl").read_bytes()
            == (tmp_path / "full" / "metrics.jsonl").read_bytes())


def test_per_domain_and_format_config():
    out = per_domain({"mopd/kl/domain": jnp.array([0.1, 0.2]), "loss": 1.0},
                     ["math", "code"])
    assert set(out) == {"mopd/kl/math", "mopd/kl/code", "loss"}
    assert float(out["mopd/kl/code"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="2 domains"):
        per_domain({"kl/domain": np.zeros(3)}, ["math", "code"])

    text = format_config({"optimizer": {"lr": 1e-5, "b1": 0.9}, "domains": ["math"],
                          "seed": 0})
    assert text.splitlines() == ["optimizer.lr = 1e-05", "optimizer.b1 = 0.9",
                                 "domains      = ['math']", "seed         = 0"]



def _make_run(run_dir):
    store = RolloutStore(run_dir / "rollouts", max_len=MAX_LEN)
    for s in range(2):
        b = _batch(s, B=3, domains=("math", "code", "math"))
        b["teacher_logp"] = b["sampler_logp"] - 0.25  # KL estimate 0.25 per token
        b["reward"] = np.array([1.0, 0.0, 0.5]) if s == 0 else np.array([0.0, 1.0, 0.5])
        store.append(**b)
    with MetricsWriter(run_dir, tensorboard=False) as w:
        w.write(0, {"mopd/kl/math": 0.3})
        w.write(1, {"mopd/kl/math": 0.2})


def test_inspect_run(tmp_path, monkeypatch):
    _make_run(tmp_path)
    report = inspect_run(tmp_path, samples=3, decode=lambda ids: "<" + ",".join(
        map(str, ids)) + ">")
    assert "rollouts: 6 over 2 steps (0..1)" in report
    rows = {line.split()[0]: line.split() for line in report.splitlines()
            if line.split() and line.split()[0] in ("math", "code", "(all)")}
    assert rows["math"][1:3] == ["4", "0.5"] and rows["code"][1:3] == ["2", "0.5"]
    assert rows["math"][4] == rows["code"][4] == rows["(all)"][4] == "0.25"
    assert rows["(all)"][1] == "6"
    assert report.count("--- sample:") == 3
    assert "domain code" in report and "domain math" in report  # domains taken in turn
    assert "prompt:   <" in report and "response: <" in report
    assert "mopd/kl/math" in report and "latest (step 1)" in report

    monkeypatch.setattr(inspect_mod, "_BLOCK_ROWS", 2)  # stats streamed in blocks: same report
    assert inspect_run(tmp_path, samples=3, decode=lambda ids: "<" + ",".join(
        map(str, ids)) + ">") == report

    one = inspect_run(tmp_path, samples=1, step=0)
    assert "step 0: 3 rollouts" in one and one.count("--- sample: step 0") == 1
    assert "latest (step 0)" in one


def test_inspect_run_errors(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path / "missing")):
        inspect_run(tmp_path / "missing")
    with pytest.raises(StoreError, match=f"{tmp_path}.*rollouts"):
        inspect_run(tmp_path)
