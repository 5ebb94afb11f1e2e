"""Benchmarks run end to end at tiny sizes: every figure is finite and the references ran;
the interleaving and statistics helpers; the README's tables are what the report writes.

No timing is asserted here (timing claims live in the benches' own output)."""

import json
import math
import pathlib
import sys

import pytest

from helpers import FP32_LOGPROB_ATOL
from mopd_jax import bench
from mopd_jax.bench import all as bench_all
from mopd_jax.bench import report
from mopd_jax.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEASURED = ROOT / "mopd_jax" / "bench" / "measured.json"  # what the README's tables come from

TINY_STEP = ["bench", "step", "--layers", "0", "--batch", "2", "--seq", "16", "--iters", "1",
             "--peak-size", "256"]


def _run(argv):
    args = build_parser().parse_args(argv)
    return args.run(args)


def _positive(res, *keys):
    for k in keys:
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])


@pytest.mark.parametrize("model, objective, optimizer", [("tiny", "sft", "adamw"),
                                                         ("tiny-moe", "mopd-A", "adamw"),
                                                         ("tiny", "sft", "sgd")])
def test_step_bench_figures_and_torch_reference(model, objective, optimizer, capsys):
    res = _run(TINY_STEP + ["--model", model, "--objective", objective,
                            "--optimizer", optimizer])
    out = capsys.readouterr().out
    _positive(res, "peak_flops", "step_s", "tok_s", "model_flops", "xla_flops",
              "achieved_flops", "pct_peak", "torch_step_s", "torch_fwd_bwd_s", "x_torch")
    assert res["achieved_flops"] == pytest.approx(res["model_flops"] / res["step_s"])
    # Same initial weights, same loss definition: the first step's losses agree.
    assert abs(res["loss"] - res["torch_loss"]) < FP32_LOGPROB_ATOL
    assert "% of peak (target >= 40%)" in out and "(target >= 1x)" in out


def test_step_bench_without_torch_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    res = _run(TINY_STEP + ["--model", "tiny"])
    out = capsys.readouterr().out
    _positive(res, "tok_s", "pct_peak")
    assert "x_torch" not in res
    assert "torch: skipped" in out and "pip install" in out


def test_loss_bench_chunked_memory_is_within_target():
    """Compile-only at the issue's shapes (V=151,936, 8 x 4096 tokens, D=2048, bf16): XLA's temp
    memory of every chunked estimator's loss + gradient is <= 5% of the naive version's."""
    res = _run(["bench", "loss"])
    assert set(res["estimators"]) == {"A", "B", "C"}
    for est, r in res["estimators"].items():
        assert r["ratio"] <= 0.05, (est, r)


# ------------------------------------------------------------------------------ helpers
def test_interleaved_alternates_contenders_and_times_each_call():
    calls, ticks = [], iter(range(100))
    fns = {"ours": lambda: calls.append("ours") or len(calls),
           "ref": lambda: calls.append("ref") or -len(calls)}
    times, results = bench.interleaved(fns, 3, clock=lambda: next(ticks), gap_s=0)
    assert calls == ["ours", "ref"] * 3
    assert times == {"ours": [1, 1, 1], "ref": [1, 1, 1]}  # one tick per call
    assert results == {"ours": [1, 3, 5], "ref": [-2, -4, -6]}
    import gc
    seen = []
    bench.interleaved({"x": lambda: seen.append(gc.isenabled())}, 2, gap_s=0)
    assert seen == [False, False] and gc.isenabled()  # paused during a call only


def test_spread_ratios_and_conversions():
    s = bench.spread([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert bench.ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="rounds"):
        bench.ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no measurements"):
        bench.spread([])
    # seconds -> tokens/s: the slowest round is the lowest rate
    assert bench.inverse(bench.spread([0.5, 1.0, 2.0]), 10) == {
        "median": 10.0, "min": 5.0, "max": 20.0, "n": 3}
    assert bench.scaled(s, 1e3)["max"] == 1e4
    assert bench.fmt(bench.spread([8.1, 8.3, 8.6])) == "8.3 (8.1–8.6)"
    assert bench.fmt(bench.spread([4.0])) == "4.0"
    assert bench.fmt(None) == "-"


def test_other_cores_is_the_cpu_time_of_other_processes():
    # (wall s, machine busy CPU s, own CPU s): 10 s in which the machine was busy 15 CPU s,
    # 5 of them ours -> others kept one core busy
    assert bench.other_cores((0.0, 100.0, 2.0), (10.0, 115.0, 7.0)) == 1.0
    assert bench.other_cores((0.0, 100.0, 2.0), (10.0, 104.0, 7.0)) == 0.0  # tick rounding
    assert bench.other_cores(None, (1.0, 1.0, 1.0)) is None
    snap = bench.cpu_snapshot()
    assert snap is None or len(snap) == 3


def test_environment_names_threads_versions_and_load():
    import torch
    before = torch.get_num_threads()
    with bench.equal_threads() as n:
        env = bench.environment()
        assert env["xla_threads"] >= 1 and n >= 1
        assert env["torch_threads"] == torch.get_num_threads() == n
    assert torch.get_num_threads() == before
    assert env["versions"]["jax"] and len(env["load"]) == 3
    line = bench.format_environment(env)
    for part in (f"threads: XLA {env['xla_threads']}, torch {n}", "jax ", "load average",
                 env["date"]):
        assert part in line, (part, line)


# ------------------------------------------------------------------------------ report
def _spread(med, lo, hi, n=3):
    return {"median": med, "min": lo, "max": hi, "n": n}


def _doc():
    """A hand-made ``mopd bench all`` document: one run of each bench kind."""
    env = {"date": "2030-01-02 03:04 UTC", "git": "abc1234", "cpu": "Test CPU", "cores": 2,
           "usable_cores": 2, "device": "cpu:cpu x1", "xla_threads": 2, "torch_threads": 2,
           "versions": {"jax": "0.0.1", "torch": "9.9"}, "python": "3.11.0", "xla_flags": "",
           "load": [0.1, 0.2, 0.3]}
    sample_row = {
        "model": "qwen3-0.6b", "layers": 28, "batch": 16, "prompt_len": 32, "new_tokens": 32,
        "ours_tok_s": _spread(34.5, 33.0, 35.0), "hf_tok_s": _spread(46.5, 45.0, 47.0),
        "x_hf": _spread(0.74, 0.72, 0.77), "match": 1.0, "hf_cache": "dynamic",
        "step_ms": _spread(400.0, 390.0, 410.0), "hf_step_ms": _spread(344.0, 340.0, 350.0),
        "x_hf_step": _spread(0.86, 0.84, 0.88), "step_gflop": 19.5,
        "step_gflop_s": _spread(48.8, 47.6, 50.0), "hf_step_gflop_s": _spread(56.7, 55.7, 57.4),
        "roofline_ms": 107.3, "pct_roofline": 26.8, "prefill_ms": _spread(900.0, 880.0, 950.0),
        "hf_prefill_ms": _spread(700.0, 690.0, 720.0), "rollout_other_ms_per_step": 3.25,
        "generate_steps": 31,
        "profile": {"busy_ms": 776.0, "steps": 3, "wall_ms": 400.0, "ops": [
            {"op": "matmul (ynn) f32[16,1024] x f32[151936,1024] -> f32[16,151936]",
             "ms": 188.8, "share": 0.243, "calls": 1, "gflop": 4.98, "wall_ms": 97.2,
             "gflop_s": 51.2},
            {"op": "xla kLoop reduce -> (f32[16], s32[16])", "ms": 45.5, "share": 0.059,
             "calls": 1, "gflop": 0.0, "wall_ms": 23.4, "gflop_s": None}]}}
    runs = [
        {"name": "loss", "bench": "loss", "command": "mopd bench loss", "wall_s": 9.0,
         "load_end": [1.0, 0.5, 0.25], "other_cores": 0.03,
         "result": {"env": env, "vocab": 151936, "batch": 8, "seq": 4096, "hidden": 2048,
                    "estimators": {"A": {"chunked_temp_bytes": 2**30, "naive_temp_bytes": 2**35,
                                         "ratio": 2**-5}}}},
        {"name": "step-sft", "bench": "step", "command": "mopd bench step --iters 3",
         "wall_s": 30.0,
         "result": {"env": env, "model": "qwen3-0.6b", "layers": 2, "batch": 4, "seq": 128,
                    "dtype": "float32", "objective": "sft", "iters": 3, "peak_flops": 1.5e11,
                    "step_ms": _spread(11000.0, 10000.0, 12000.0),
                    "tok_s_spread": _spread(46.5, 42.7, 51.2),
                    "pct_peak_spread": _spread(60.0, 55.0, 66.0),
                    "torch_step_ms": _spread(12000.0, 11000.0, 13000.0),
                    "x_torch_spread": _spread(1.09, 0.98, 1.2), "loss": 12.0,
                    "torch_loss": 12.00001}},
        {"name": "sample-0.6b", "bench": "sample",
         "command": "mopd bench sample --models qwen3-0.6b --profile --iters 3", "wall_s": 300.0,
         "result": {"env": env, "bandwidth": {"copy": 2.4e10}, "iters": 3, "rows": [sample_row]}},
        {"name": "moe", "bench": "moe", "command": "mopd bench moe --iters 3", "wall_s": 60.0,
         "result": {"env": env, "tokens": 128, "layers": 1, "E": 128, "k": 8, "hidden": 2048,
                    "expert_ffn": 768, "dtype": "float32", "iters": 3, "mode": "train",
                    "dense_ms": _spread(26880.0, 21020.0, 27000.0),
                    "impls": {"blocked": {"ms": _spread(3000.0, 2900.0, 3100.0),
                                          "x_dense": _spread(8.96, 7.2, 9.1),
                                          "max_abs_diff": 1.1e-6,
                                          "grad_max_abs_diff": 2.2e-6}}}},
    ]
    return {"command": "mopd bench all --json out.json --iters 3", "env": env, "quick": False,
            "runs": runs, "wall_s": 399.0, "load_end": [0.5, 0.4, 0.3]}


def test_markdown_names_every_command_the_date_and_the_environment():
    md = report.markdown(json.loads(json.dumps(_doc())), source="out.json")
    assert md.startswith("Measured by `mopd bench all --json out.json --iters 3` on "
                         "2030-01-02 03:04 UTC (git abc1234, 6 min 39 s wall)")
    assert "threads: XLA 2, torch 2" in md and "load average at the end 0.50 0.40 0.30" in md
    for cmd in ("mopd bench loss", "mopd bench step --iters 3", "mopd bench moe --iters 3",
                "mopd bench sample --models qwen3-0.6b --profile --iters 3"):
        assert f"**`{cmd}`** (2030-01-02 03:04 UTC, git abc1234, " in md
    assert "**`mopd bench loss`** (2030-01-02 03:04 UTC, git abc1234, 9 s; load 0.10 0.20 " \
           "0.30 → 1.00 0.50 0.25; other processes kept 0.03 cores busy)" in md
    lines = md.splitlines()
    assert "| A | 1.00 GiB | 32.0 GiB | 3.12% |" in lines
    assert ("| sft | qwen3-0.6b (2) | 4 × 128 | 11000.0 (10000.0–12000.0) | 46.5 (42.7–51.2) | "
            "60.0 (55.0–66.0) | 12000.0 (11000.0–13000.0) | 1.09 (0.98–1.20)× | "
            "12.0000 / 12.0000 |") in lines
    assert ("| qwen3-0.6b (28) | 16 | 34.5 (33.0–35.0) | 46.5 (45.0–47.0) | "
            "0.74 (0.72–0.77)× | 1.00 | dynamic |") in lines
    assert ("| qwen3-0.6b (28) | 16 | 400.00 (390.00–410.00) | 344.00 (340.00–350.00) | "
            "0.86 (0.84–0.88)× | 19.50 | 48.8 (47.6–50.0) | 56.7 (55.7–57.4) | 107.30 | 27% | "
            "900.0 (880.0–950.0) / 700.0 (690.0–720.0) | 31 | 3.25 |") in lines
    assert "Below transformers (median ratio < 1): qwen3-0.6b (28) batch 16." in lines
    assert ("| 24.3% | 97.2 | 1 | 51.2 | "
            "`matmul (ynn) f32[16,1024] x f32[151936,1024] -> f32[16,151936]` |") in lines
    assert "776 thread-ms busy per 400 ms step; matmuls 24% of it" in md
    assert "max abs diff |" in md
    assert "| E=128 k=8 D=2048 F=768 | 128 × 1 | blocked | 3000 (2900–3100) | " \
           "26880 (21020–27000) | 8.96 (7.20–9.10)× | 1.1e-06 | 2.2e-06 |" in lines


def test_update_readme_replaces_only_the_generated_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.update_readme(readme, "new table\n")
    assert readme.read_text() == (f"# x\n\nbefore\n{report.BEGIN}\nnew table\n{report.END}\n"
                                  "after\n")
    assert report.generated_block(readme.read_text()) == "new table"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="generated benchmark block"):
        report.update_readme(readme, "x")


def test_readme_tables_are_the_report_of_the_committed_measurements():
    """The README's benchmark block is exactly what `mopd bench report` writes from
    mopd_jax/bench/measured.json: regenerate it, never edit it by hand."""
    doc = json.loads(MEASURED.read_text())
    want = report.markdown(doc, source="mopd_jax/bench/measured.json").strip()
    assert report.generated_block((ROOT / "README.md").read_text()) == want
    assert not doc["quick"]


def test_bench_all_arguments_per_run():
    args = build_parser().parse_args(["bench", "all", "--json", "o.json", "--iters", "5",
                                      "--layers", "4"])
    runs = dict(bench_all.RUNS)
    assert bench_all.bench_argv("loss", runs["loss"], args) == ["loss"]
    assert bench_all.bench_argv("sample-0.6b", runs["sample-0.6b"], args)[-4:] == [
        "--layers", "4", "--iters", "5"]
    assert "--layers" not in bench_all.bench_argv("sample-tiny", runs["sample-tiny"], args)
    assert bench_all.command(args) == "mopd bench all --json o.json --iters 5 --layers 4"
    quick = build_parser().parse_args(["bench", "all", "--json", "o.json", "--quick"])
    argv = bench_all.bench_argv("step-mopd", runs["step-mopd"], quick)
    assert argv[:1] == ["step"] and "tiny" in argv and argv[-4:-2] == ["--objective", "mopd-A"]
    assert "--profile" in bench_all.bench_argv("sample-0.6b", runs["sample-0.6b"], quick)
    argv = bench_all.bench_argv("step-sft-28", runs["step-sft-28"], quick)
    assert "tiny" in argv and argv[-6:-2] == ["--optimizer", "sgd", "--scan-layers", "off"]


def test_bench_all_writes_json_and_the_readme_block(tmp_path, capsys):
    out, readme = tmp_path / "b.json", tmp_path / "README.md"
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    doc = _run(["bench", "all", "--json", str(out), "--quick", "--only", "loss",
                "--readme", str(readme)])
    assert capsys.readouterr().out.startswith("environment: ")
    assert json.loads(out.read_text())["runs"][0]["command"] == doc["runs"][0]["command"]
    block = report.generated_block(readme.read_text())
    assert block == report.markdown(doc, source=str(out)).strip()
    assert "Quick sizes" in block
    with pytest.raises(ValueError, match="unknown run"):
        _run(["bench", "all", "--json", str(out), "--only", "nope"])
    # --update re-measures the named runs into the file and keeps its history of commands
    again = _run(["bench", "all", "--json", str(out), "--quick", "--only", "loss", "--update"])
    assert [r["name"] for r in again["runs"]] == ["loss"]
    assert again["commands"] == [doc["command"], doc["command"] + " --update"]
    assert f", then `{doc['command']} --update`" in report.markdown(again)


def test_rollout_dispatches_no_step_past_the_length_cap():
    """The sample bench's rollout overhead: N new tokens take the prefill's token and N - 1
    decode steps (the one-step-late read once dispatched an N-th step for nothing)."""
    import dataclasses

    from flax import nnx

    import models
    from models.config import preset
    from mopd_jax.sampling.engine import Engine
    from mopd_jax.sampling.rollout import rollout
    from mopd_jax.sampling.sampler import GREEDY

    cfg = preset("tiny")
    graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)))
    engine = Engine(graphdef, params, max_concurrent_decodes=2, max_prefill_length=16,
                    max_target_length=40)
    prompts = [[3, 4, 5], [6, 7, 8, 9], [10, 11]]
    batch = rollout(engine, params, prompts, sampling=dataclasses.replace(GREEDY,
                                                                         max_new_tokens=6))
    assert list(batch.response_lengths) == [6, 6, 6] and batch.finish_reason == ["length"] * 3
    # two slots: prompts 0 and 1 together (5 steps), then prompt 2 (5 more, none wasted while
    # the host reads the step that ended the first two)
    assert batch.stats["generate_steps"] == 5 + 5
    one = rollout(engine, params, prompts[:1], sampling=dataclasses.replace(GREEDY,
                                                                           max_new_tokens=6))
    assert one.stats["generate_steps"] == 5
    capped = rollout(engine, params, [list(range(1, 16))])  # cache room: 40 - 15 = 25 tokens
    assert capped.response_lengths[0] == 25 and capped.stats["generate_steps"] == 24
