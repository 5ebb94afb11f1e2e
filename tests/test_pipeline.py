"""The MOPD pipeline end to end: routing, bad inputs, kill/resume, SIGTERM, the quick demo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from models.config import preset
from models import build
from mopd_jax.cli import main as cli_main
from mopd_jax.estimators import DistillLossConfig
from mopd_jax.steps import score_step
from mopd_jax.teachers import Teacher, TeacherError, TeacherPool

ROOT = Path(__file__).resolve().parents[1]


def small_config(out: Path, **sections) -> dict:
    """A MOPD run on the built-in domains that takes seconds: 'self' teacher as fallback."""
    cfg = {
        "run": {"name": "t", "out_dir": str(out), "recipe": "mopd", "checkpoint_every": 2,
                "seed": 3},
        "model": {"preset": "demo-moe"},
        "data": {"builtin": ["add", "sort"], "builtin_size": 64, "eval_size": 4,
                 "max_prompt_len": 16},
        "rollout": {"max_new_tokens": 6, "slots": 16},
        "mopd": {"prompts_per_step": 8, "fallback": "self"},
        "optimizer": {"lr": 1e-3, "total_steps": 6},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device, like a user's laptop
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def mopd(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mopd_jax.cli", *args], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def finished(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def comparable(rows):
    """metrics.jsonl rows without wall-clock fields."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- routing
def _tiny_teacher(name, seed):
    graphdef, params = nnx.split(build(preset("tiny"), nnx.Rngs(seed)))
    return Teacher(name, graphdef, params, 128)


def test_routing_is_per_sample_and_hard():
    pool = TeacherPool({"a": "T1", "b": "T2"}, None,
                       {"T1": _tiny_teacher("T1", 1), "T2": _tiny_teacher("T2", 2)})
    tokens = np.random.default_rng(0).integers(3, 128, (5, 12)).astype(np.int32)
    domains = ["a", "b", "b", "a", "b"]
    cfg = DistillLossConfig(estimator="A", vocab_chunk=128)
    got = pool.score(tokens, domains, cfg).logp_BT
    for i, d in enumerate(domains):
        t = pool.teachers["T1" if d == "a" else "T2"]
        want = np.asarray(score_step(t.graphdef, t.params, tokens[i:i + 1], loss_cfg=cfg).logp_BT)
        np.testing.assert_allclose(got[i], want[0], rtol=1e-5, atol=1e-5)
    # T1 and T2 differ, so a row scored by the wrong teacher would not match.
    other = score_step(pool.teachers["T2"].graphdef, pool.teachers["T2"].params, tokens[:1],
                       loss_cfg=cfg).logp_BT
    assert np.abs(np.asarray(other)[0] - got[0]).max() > 1e-3

    with pytest.raises(TeacherError, match="domain 'c' has no teacher"):
        pool.route(["a", "c"])
    pool.fallback = "T1"
    assert pool.route(["a", "c", "b"]) == ["T1", "T1", "T2"]


@pytest.mark.parametrize("estimator", ["A", "B", "C"])
def test_length_buckets_and_host_placement_score_like_the_full_width(estimator, monkeypatch):
    """Cutting each teacher's batch to a length bucket, and holding teachers in host memory,
    give the full-width resident scores on every position inside a row."""
    import jax

    import mopd_jax.teachers as teachers_mod
    shapes = []
    real = teachers_mod.score_step
    monkeypatch.setattr(teachers_mod, "score_step",
                        lambda g, p, tok, **kw: shapes.append(tok.shape) or real(g, p, tok, **kw))
    teachers = {"T1": _tiny_teacher("T1", 1), "T2": _tiny_teacher("T2", 2)}
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 128, (6, 40)).astype(np.int32)
    lengths = np.array([9, 14, 5, 12, 40, 7])  # T2's rows fit a 16 bucket, T1's need all 40
    domains = ["a", "b", "b", "b", "a", "b"]
    cfg = DistillLossConfig(estimator=estimator, vocab_chunk=128, topk=8)
    full = TeacherPool({"a": "T1", "b": "T2"}, None, teachers).score(tokens, domains, cfg)
    cut = TeacherPool({"a": "T1", "b": "T2"}, None, teachers).score(tokens, domains, cfg,
                                                                   lengths=lengths)
    host = TeacherPool({"a": "T1", "b": "T2"}, None,
                       {k: Teacher(t.name, t.graphdef, jax.device_get(t.params), t.vocab_size)
                        for k, t in teachers.items()}, placement="host").score(
        tokens, domains, cfg, lengths=lengths)
    chunked = TeacherPool({"a": "T1", "b": "T2"}, None, teachers, score_rows=3).score(
        tokens, domains, cfg, lengths=lengths)  # mopd.score_rows: calls of 3 rows
    # full width: both teachers at 40; cut: T1 (rows 0, 4) keeps 40, T2 (max length 14) -> 16;
    # chunked: T1's 2 rows in one call of 3, T2's 4 rows in two
    assert shapes == [(8, 40), (8, 40), (8, 40), (8, 16), (8, 40), (8, 16), (3, 40), (3, 16),
                      (3, 16)]
    fields = {"A": ["logp_BT"], "B": ["logp_BT", "topk_logp_BTk"], "C": ["hidden_BTD"]}
    for field in fields[estimator]:
        if field == "hidden_BTD":  # C's teacher hidden states stay on device
            assert all(isinstance(getattr(x, field), jax.Array) for x in (full, chunked))
        a, b, h, c = (np.asarray(getattr(x, field)) for x in (full, cut, host, chunked))
        assert a.shape == b.shape == h.shape == c.shape
        for i, n in enumerate(lengths):
            valid = n - 1 if field != "hidden_BTD" else n
            np.testing.assert_allclose(b[i, :valid], a[i, :valid], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(h[i, :valid], a[i, :valid], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(c[i, :valid], a[i, :valid], rtol=1e-5, atol=1e-5)
    if estimator == "C":
        np.testing.assert_array_equal(cut.teacher_index_B, full.teacher_index_B)
        np.testing.assert_allclose(np.asarray(host.w), np.asarray(full.w), rtol=1e-6)


# ----------------------------------------------------------------------------- bad inputs
def _fails(capsys, argv, *needles):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mopd train: error: "), err
    for n in needles:
        assert n in last, last
    return last


def test_bad_inputs_one_clear_message_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "add:1+1=", "domain": "add", "answer": "2"}\n{"prompt": oops}\n')
    cfg = small_config(out)
    cfg["data"] = {**cfg["data"], "builtin": [], "files": [str(bad)]}
    _fails(capsys, ["train", str(write_config(tmp_path / "c1.yaml", cfg))], f"{bad}:2")

    cfg = small_config(out, mopd={"fallback": "", "teachers": {"add": "self"}})
    _fails(capsys, ["train", str(write_config(tmp_path / "c2.yaml", cfg))],
           "no teacher for domain(s) ['sort']", "mopd.fallback")

    cfg = small_config(out, mopd={"teachers": {"add": str(tmp_path / "missing")}})
    _fails(capsys, ["train", str(write_config(tmp_path / "c3.yaml", cfg))],
           str(tmp_path / "missing"), "not found")

    cfg = small_config(out, model={"preset": "demo-moe", "vocab_size": 16})
    _fails(capsys, ["train", str(write_config(tmp_path / "c4.yaml", cfg))], "vocab")

    from mopd_jax.checkpoint import save_model
    foreign = tmp_path / "foreign"
    save_model(foreign, nnx.split(build(preset("tiny"), nnx.Rngs(0)))[1], preset("tiny"))
    cfg = small_config(out, mopd={"teachers": {"add": str(foreign)}})
    _fails(capsys, ["train", str(write_config(tmp_path / "c4b.yaml", cfg))],
           "vocabulary size 128 != student 32")

    cfg = small_config(out, data={"only_domains": ["nope"]})
    _fails(capsys, ["train", str(write_config(tmp_path / "c5.yaml", cfg))], "nope")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = small_config(out, data={"builtin": [], "files": [str(empty)]})
    _fails(capsys, ["train", str(write_config(tmp_path / "c6.yaml", cfg))], "no training prompts")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = small_config(blocker / "run")
    _fails(capsys, ["train", str(write_config(tmp_path / "c7.yaml", cfg))], "run.out_dir",
           "writable")
    assert not (out / "checkpoints").exists()


def test_too_long_prompts_are_dropped_and_counted(tmp_path):
    from mopd_jax.config import build, Config
    from mopd_jax.recipes import common

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "add:1+2=", "domain": "add", "answer": "3"},
            {"prompt": "add:" + "1" * 40 + "+2=", "domain": "add", "answer": "x"}] * 8
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = build(Config, small_config(tmp_path / "r", data={"builtin": [], "files": [str(data)],
                                                           "max_prompt_len": 12}))
    run = common.setup(cfg, quiet=True)
    pipe = common.make_pipeline(run, 4)
    batch = next(pipe)
    assert all(len(p.tokens) <= 12 for p in batch)
    assert pipe.stats["dropped"] >= 4 and pipe.stats["seen"] >= 8


# ----------------------------------------------------------------------------- resume
def _wait_for(path: Path, p, timeout=400, lines=0):
    """Until ``path`` exists (and has ``lines`` lines), failing if the process ends first."""
    t0 = time.time()
    while not path.exists() or (lines and len(path.read_text().splitlines()) < lines):
        if p.poll() is not None:
            raise AssertionError(p.communicate())
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


def test_sigkill_then_resume_gives_the_same_metrics(tmp_path):
    long_rows = {"scan_layers": True, "attention_impl": "blockwise"}  # issue 14's paths
    ref = write_config(tmp_path / "ref.yaml", small_config(tmp_path / "ref", model=long_rows))
    rc, out, err = finished(mopd("train", str(ref)))
    assert rc == 0, err[-3000:]

    cut = write_config(tmp_path / "cut.yaml", small_config(tmp_path / "cut", model=long_rows))
    p = mopd("train", str(cut))
    _wait_for(tmp_path / "cut" / "checkpoints" / "4" / "commit_success.txt", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    rc, out, err = finished(mopd("train", str(cut), "--resume"))
    assert rc == 0, err[-3000:]
    assert "resumed" in err

    want = comparable(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    got = comparable(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want
    from mopd_jax.rollout_store import RolloutStore
    a = RolloutStore.open(tmp_path / "ref" / "rollouts").read()
    b = RolloutStore.open(tmp_path / "cut" / "rollouts").read()
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["step"], b["step"])


def test_sigterm_saves_a_usable_checkpoint(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", small_config(
        tmp_path / "run", run={"checkpoint_every": 100}, optimizer={"total_steps": 200}))
    p = mopd("train", str(cfg))
    _wait_for(tmp_path / "run" / "metrics.jsonl", p, lines=1)  # inside the training loop
    p.send_signal(signal.SIGTERM)
    rc, out, err = finished(p)
    assert rc == 143, err[-3000:]  # 128 + SIGTERM
    assert "continue with --resume" in err
    from mopd_jax.run_checkpoint import RunCheckpointer
    steps = RunCheckpointer(tmp_path / "run" / "checkpoints").all_steps()
    assert steps and steps[-1] < 200
    rc, out, err = finished(mopd("train", str(cfg), "--resume", "--allow-config-change", "--set",
                                 f"optimizer.total_steps={steps[-1] + 1}"))
    assert rc == 0, err[-3000:]
    assert f"resumed {tmp_path / 'run'} at step {steps[-1]}" in err


# ----------------------------------------------------------------------------- demo
def test_quick_demo_produces_the_table_and_report(tmp_path):
    rc, out, err = finished(mopd("demo", "--quick", "--out", str(tmp_path / "demo")), 900)
    assert rc == 0, err[-3000:]
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["domain"] for r in res["rows"]] == ["add", "rev", "sort"]
    for r in res["rows"]:
        assert 0.0 <= r["base"] <= 1.0 and 0.0 <= r["student"] <= 1.0
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| add |" in report and "mopd_kl.png" in report
    assert (tmp_path / "demo" / "mopd_kl.png").stat().st_size > 1000
    assert "mean normalised score" in out

    rc, out, err = finished(mopd("inspect", str(tmp_path / "demo" / "mopd"), "--samples", "2"))
    assert rc == 0, err[-3000:]
    assert "rollouts:" in out and "add" in out and "prompt:   add:" in out
    rc, out, err = finished(mopd("eval", str(tmp_path / "demo" / "mopd" / "config.yaml"),
                                 "--checkpoint", str(tmp_path / "demo" / "mopd" / "model"),
                                 "--json", str(tmp_path / "eval.json")))
    assert rc == 0, err[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    want = {r["domain"]: r["student"] for r in res["rows"]}
    assert scores == pytest.approx(want)

    # `mopd compare --quick` on the same directory reuses the demo's pi_0 and teachers and
    # produces every row, the second round included.
    rc, out, err = finished(mopd("compare", "demo", "--quick", "--second-round", "--out",
                                 str(tmp_path / "demo")), 900)
    assert rc == 0, err[-3000:]
    assert "[sft] done earlier" in err and "[teacher_add] done earlier" in err
    import csv
    rows = list(csv.DictReader(open(tmp_path / "demo" / "compare.csv")))
    methods = {"mopd_A", "mix_rl", "cascade", "offpolicy_ft", "merge_avg", "merge_ta",
               "merge_ties", "mopd_A_round2"}
    assert {r["method"] for r in rows} == methods
    for r in rows:
        if r["domain"] != "mean" and not r["method"].startswith("merge"):
            assert float(r["samples"]) > 0, r
    by = {(r["method"], r["domain"]): r for r in rows}
    assert by[("mopd_A", "add")]["pi0"] == by[("mix_rl", "add")]["pi0"]  # one pi_0 for all
    md = (tmp_path / "demo" / "compare.md").read_text()
    for name in ("MOPD (A)", "Mix-RL", "Cascade RL", "Off-Policy FT", "Param-Merge (Avg)",
                 "Param-Merge (Task Arithmetic)", "Param-Merge (TIES)",
                 "MOPD (A), second round"):
        assert f"| {name} |" in md
    assert (tmp_path / "demo" / "compare_samples.png").stat().st_size > 1000

    # Off-Policy FT from the teachers' rollout stores instead of fresh generations
    cfg = yaml.safe_load((tmp_path / "demo" / "mopd" / "config.yaml").read_text())
    cfg["run"].update(out_dir=str(tmp_path / "offstore"), recipe="offpolicy_ft", eval_every=0)
    cfg["offpolicy"] = {"source": "store", "prompts_per_step": 8, "min_reward": 1.0}
    cfg["optimizer"].update(total_steps=2, warmup_steps=0)  # warm-up <= the run (checked)
    rc, out, err = finished(mopd("train", str(write_config(tmp_path / "off.yaml", cfg))))
    assert rc == 0, err[-3000:]
    mrows = [json.loads(x) for x in
             (tmp_path / "offstore" / "metrics.jsonl").read_text().splitlines()]
    assert max(sum(v for k, v in r.items() if k.startswith("samples/")) for r in mrows) == 16
    assert (tmp_path / "offstore" / "model" / "model.json").is_file()
