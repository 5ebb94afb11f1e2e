"""Operator-grade runs (issue 17): bad inputs fail in one line before any work, nothing is
overwritten that a command did not create, logs show progress, the config on disk is the run's,
and the README's custom-domain example runs exactly as written."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flax import nnx

from models import build
from models.config import preset
from mopd_jax.checkpoint import save_model
from mopd_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "add:1+2=", "domain": "add", "answer": "3"}


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Two demo-moe models (random, different seeds) with the built-in tokenizer beside them."""
    d = tmp_path_factory.mktemp("models")
    cfg = preset("demo-moe")
    for name, seed in (("base", 0), ("other", 1)):
        save_model(d / name, nnx.split(build(cfg, nnx.Rngs(seed)))[1], cfg)
    from mopd_jax.data import domains
    tok = domains.tokenizer()
    (d / "base" / "char_tokenizer.json").write_text(json.dumps(
        {"alphabet": tok.alphabet, "vocab_size": tok.vocab_size}))
    return d


def small(out, **sections) -> dict:
    cfg = {"run": {"name": "t", "out_dir": str(out), "recipe": "sft"},
           "model": {"preset": "demo-moe"},
           "data": {"builtin": ["add"], "builtin_size": 16, "eval_size": 2, "max_prompt_len": 16},
           "rollout": {"max_new_tokens": 4, "slots": 8},
           "sft": {"batch_size": 4},
           "optimizer": {"lr": 1e-3, "total_steps": 2}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def jsonl(path: Path, *records, raw: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + raw)
    return path


def bad_inputs(tmp: Path, models: Path) -> list:
    """(argv, words the one error line must contain, paths that must not appear or change)."""
    out = tmp / "run"
    n = [0]

    def conf(cfg=None, text=None, **sections):
        n[0] += 1
        p = tmp / f"c{n[0]}.yaml"
        if text is not None:
            p.write_bytes(text)
        else:
            p.write_text(yaml.safe_dump(cfg or small(out, **sections)))
        return str(p)

    def files(*paths, **extra):
        return conf(data={"builtin": [], "files": [str(p) for p in paths], **extra})

    d = tmp / "data"
    d.mkdir()
    blocker = tmp / "afile"
    blocker.write_text("x")
    (tmp / "existing.json").write_text("{}")
    (tmp / "busy" / "checkpoints" / "2").mkdir(parents=True)
    base, other = str(models / "base"), str(models / "other")
    ev = ["eval", conf(), "--checkpoint", base]
    return [
        (["train", str(tmp / "nope.yaml")], ["nope.yaml", "not found"]),
        (["train", conf(text=b"run: [1, 2\n")], ["not valid YAML"]),
        (["train", conf(text=b"run:\n  name: caf\xe9\n")], ["not UTF-8"]),
        (["train", conf(), "--set", "optimizer.lrr=1"], ["optimizer.lrr", "did you mean 'lr'"]),
        (["train", conf(), "--set", "optimizer.lr=fast"], ["optimizer.lr", "expected a number"]),
        (["train", conf(), "--set", "run.recipe=sfft"], ["run.recipe", "unknown recipe"]),
        (["train", conf(), "--set", "optimizer.lr"], ["--set optimizer.lr", "path.to.field"]),
        (["train", conf(), "--log-every", "often"], ["--log-every", "30s"]),
        (["train", conf(), "--set", "optimizer.warmup_steps=5"], ["optimizer.warmup_steps=5",
                                                                  "total_steps=2"]),
        (["train", conf(), "--set", "data.default_reward=exact"], ["data.default_reward",
                                                                   "exact_match"]),
        (["train", files(jsonl(d / "r1.jsonl", GOOD, {**GOOD, "reward": "exactmatch"}))],
         ["r1.jsonl:2", "'exactmatch' is not registered"]),
        (["train", files(jsonl(d / "t1.jsonl", GOOD), eval_files=[str(jsonl(
            d / "e1.jsonl", GOOD, {**GOOD, "reward": "mth"}))])], ["e1.jsonl:2", "'mth'"]),
        (["train", files(jsonl(d / "r2.jsonl", {"prompt": "add:1=", "domain": "add"}))],
         ["r2.jsonl:1", "answer"]),
        (["train", files(jsonl(d / "r3.jsonl", {**GOOD, "reward": "code"}))],
         ["r3.jsonl:1", "tests"]),
        (["train", conf(data={"weights": {"add": 1.0, "ad": 1.0}})], ["data.weights", "'ad'"]),
        (["train", conf(rollout={"max_new_tokens": 100})], ["rollout.max_new_tokens",
                                                           "context of 64"]),
        (["train", conf(rollout={"slots": 10 ** 9})], ["memory", "KV cache", "rollout.slots"]),
        (["train", files(jsonl(d / "u.jsonl", {**GOOD, "prompt": "What is 1+2?"}))],
         ["unknown token", "u.jsonl:1", "data.tokenizer"]),
        (["train", files(jsonl(d / "l1.jsonl", GOOD, raw=b'{"prompt": "caf\xe9"}\n'))],
         ["l1.jsonl:2", "not UTF-8"]),
        (["train", files(d)], ["is a directory"]),
        (["train", files(d / "missing.jsonl")], ["missing.jsonl", "no such file"]),
        (["train", files(jsonl(d / "m.jsonl", GOOD, raw=b'{"prompt": oops}\n'))],
         ["m.jsonl:2", "malformed JSON"]),
        (["train", files(jsonl(d / "nd.jsonl", {"prompt": "add:1="}))], ["missing 'domain'"]),
        (["train", files(d / "x.csv")], ["x.csv", "unknown extension"]),
        (["train", conf(data={"only_domains": ["sub"]})], ["data.only_domains", "sub"]),
        (["train", conf(cfg=small(blocker))], ["run.out_dir", "is a file"]),
        (["train", conf(cfg=small(tmp / "busy"))], ["already holds a run", "--resume"]),
        (["train", conf(run={"init": base}), "--set", "model.hidden_size=128"],
         ["model.hidden_size=128", "run.init"]),
        (["train", conf(run={"init": str(tmp / "no_pi0")})], ["run.init", "not found"]),
        (["merge", "--base", base, "--models", other, "--out", base], ["--out", "input"]),
        (["merge", "--base", base, "--models", other, "--out", other], ["--out", "input"]),
        (["merge", "--base", base, "--models", base, "--out", str(blocker)], ["--out", "file"]),
        (["merge", "--base", str(tmp / "nobase"), "--models", other, "--out", str(tmp / "m")],
         ["--base", "not found"]),
        ([*ev, "--json", str(tmp / "existing.json")], ["--json", "already exists"]),
        ([*ev, "--json", str(tmp)], ["--json", "is a directory"]),
        ([*ev, "--json", base], ["--json", "input"]),
        (["eval", conf(data={"builtin": [], "files": [str(jsonl(d / "ne.jsonl", GOOD))]}),
          "--checkpoint", base], ["no evaluation set", "data.eval_files"]),
        (["convert", base, str(blocker), "--to", "hf"], ["DST", "is a file"]),
        (["convert", base, other, "--to", "hf"], ["DST", "already holds a model"]),
        (["score", "--checkpoint", base, "--tokens", "1,x"], ["--tokens", "comma-separated"]),
        (["score", "--preset", "demo-moe", "--text", "add:1+2="], ["--text", "no tokenizer"]),
        (["inspect", str(tmp / "norun")], ["run directory not found"]),
        (["generate", "--checkpoint", base, "--tokens", "3,4", "--greedy", "--temperature",
          "0.5"], ["--greedy"]),
    ]


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, models_dir, capsys):
    work = tmp_path / "w"
    work.mkdir()
    cases = bad_inputs(work, models_dir)
    assert len(cases) >= 30
    before = {p: tree_hash(models_dir / p) for p in ("base", "other")}
    files_before = listing(work)
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, (argv, err)
        line = err.strip()
        assert line.startswith(f"mopd {argv[0]}: error: "), line
        for w in words:
            assert w in line, (argv, line)
    assert not (work / "run").exists()  # no half-made run directory, config or rollouts
    assert listing(work) == files_before  # nor any other output
    assert {p: tree_hash(models_dir / p) for p in ("base", "other")} == before


def test_merge_never_overwrites(tmp_path, models_dir, capsys):
    base, other = models_dir / "base", models_dir / "other"
    h = tree_hash(base)
    assert main(["merge", "--base", str(base), "--models", str(other), "--out", str(base)]) == 2
    assert "--out" in capsys.readouterr().err
    assert tree_hash(base) == h  # byte-identical
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--models", str(other), "--method", "average",
                 "--out", str(out)]) == 0
    assert (out / "model.json").is_file() and (out / "merge.json").is_file()
    assert not list(tmp_path.glob(".*partial"))
    merged = tree_hash(out)
    assert main(["merge", "--base", str(base), "--models", str(other), "--out", str(out)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert tree_hash(out) == merged and tree_hash(base) == h


def test_lr_metric_is_the_optimizers_schedule():
    """lr_at against the step the optimizer really takes: with b1=b2=0 and eps=0 Adam's update
    of a parameter with gradient g is -lr * sign(g), so each update reveals that step's lr."""
    import jax.numpy as jnp
    import optax

    from mopd_jax.config import OptimizerConfig
    from mopd_jax.progress import lr_at
    from mopd_jax.steps import make_optimizer

    ocfg = OptimizerConfig(lr=0.1, warmup_steps=3, total_steps=10, min_lr_ratio=0.2, b1=0.0,
                           b2=0.0, eps=0.0, clip_norm=0.0)
    opt = make_optimizer(ocfg)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    for count in range(10):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        params = optax.apply_updates(params, updates)
        assert abs(-float(updates["w"]) - lr_at(ocfg, count)) <= 1e-7 * max(1.0, ocfg.lr)


def test_progress_lines_off_a_terminal(capsys):
    import io

    from mopd_jax.progress import RunProgress

    stream = io.StringIO()
    p = RunProgress(10, 0, "x sft", every_steps=3, stream=stream, tty=False)
    for step in range(1, 11):
        p.update(step, {"sft/loss": 1.0 / step, "sft/reward": 0.5}, "sft", samples=4 * step,
                 lr=1e-3, step_s=0.1)
    lines = stream.getvalue().splitlines()
    assert [int(re.search(r"step (\d+)/10", ln).group(1)) for ln in lines] == [1, 4, 7, 10]
    assert "compiles" in lines[0]
    for ln in lines[1:-1]:
        assert "loss" in ln and "reward 0.5" in ln and "samples/s" in ln and "ETA" in ln
    assert lines[-1].endswith("done")


def test_broken_pipe_is_one_line():
    """A verb printing more than the pipe holds into `head -c 1` (as `mopd inspect RUN | head`
    does on a long run): one line, exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = ("import sys, types; from mopd_jax.cli_support import run_verb; "
            "verb = types.SimpleNamespace(verb='inspect', "
            "run=lambda a: [print('x' * 100) for _ in range(100000)]); "
            "sys.exit(run_verb(verb, ()))")
    p = subprocess.run(f'{sys.executable} -c "{code}" | head -c 1; exit ${{PIPESTATUS[0]}}',
                       shell=True, executable="/bin/bash", env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == ("mopd inspect: output closed early (broken pipe); the rest was "
                                "not printed")


# ----------------------------------------------------------------------------- the README
def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example: custom-domain -->\n(.*?)<!-- /example -->", text, re.S)
    assert block, "README.md lost its custom-domain example"
    return "\n".join(re.findall(r"```bash\n(.*?)```", block.group(1), re.S))


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's custom-domain example, run as written: `bash -e` with stdout and stderr
    into one log file (what `mopd train CONFIG > log 2>&1` gives)."""
    work = tmp_path_factory.mktemp("readme")
    script = work / "example.sh"
    script.write_text(readme_example())
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(work / "log", "w") as log:
        rc = subprocess.run(["bash", "-e", str(script)], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    text = (work / "log").read_text()
    assert rc == 0, text[-4000:]
    return work, text


def test_readme_example_runs_and_its_log_shows_progress(readme_run):
    work, log = readme_run
    assert "Traceback" not in log
    for phase, recipe, steps in (("odd_sft", "sft", 20), ("odd_teacher", "grpo", 4),
                                 ("odd_mopd", "mopd", 4)):
        assert (work / "runs" / phase / "model" / "model.json").is_file()
        lines = [ln for ln in log.splitlines() if ln.startswith(f"[odd {recipe}] step ")]
        assert lines and lines[-1].startswith(f"[odd {recipe}] step {steps}/{steps} (100%)")
        assert any("loss " in ln and "ETA " in ln for ln in lines), lines
        assert f"model: runs/{phase}/model" in log
    assert any(" kl " in ln and "reward " in ln for ln in log.splitlines()
               if ln.startswith("[odd mopd] step "))
    assert log.count("eval (greedy mean reward on the held-out set):") == 4  # 3 runs + eval
    assert re.search(r"^  odd +\d\.\d{4}$", log, re.M)
    assert re.search(r"^wall time \S+ \(training loop \S+\)$", log, re.M)
    metrics = (work / "runs/odd_sft/metrics.jsonl").read_text()
    rows = [json.loads(ln) for ln in metrics.splitlines()]
    assert all("optimizer/lr" in r and "time/step_s" in r for r in rows if "sft/loss" in r)
    # the config on disk is the run's: run.init's model for the teacher
    teacher_cfg = yaml.safe_load((work / "runs/odd_teacher/config.yaml").read_text())
    assert teacher_cfg["run"]["recipe"] == "grpo" and teacher_cfg["model"]["name"] == "demo-moe"


def test_resume_refuses_a_changed_trajectory_unless_allowed(readme_run, tmp_path, capsys,
                                                            monkeypatch):
    work, _ = readme_run
    shutil.copytree(work / "runs" / "odd_sft", tmp_path / "odd_sft")
    shutil.copytree(work / "odd", tmp_path / "odd")
    shutil.copy(work / "odd.yaml", tmp_path / "odd.yaml")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "odd_sft"
    sets = ["--set", f"run.out_dir={run}"]
    config_before = (run / "config.yaml").read_bytes()
    metrics_before = (run / "metrics.jsonl").read_bytes()

    # a finished run: nothing to do, nothing appended
    assert main(["train", "odd.yaml", *sets, "--resume"]) == 0
    assert "already finished (step 20); nothing to do" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == metrics_before

    longer = [*sets, "--set", "optimizer.total_steps=22"]
    assert main(["train", "odd.yaml", *longer, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.total_steps changed" in err
    assert "--allow-config-change" in err
    assert (run / "config.yaml").read_bytes() == config_before
    assert (run / "metrics.jsonl").read_bytes() == metrics_before

    assert main(["train", "odd.yaml", *longer, "--resume", "--allow-config-change"]) == 0
    err = capsys.readouterr().err
    assert "resumed" in err and "optimizer.total_steps 20 -> 22" in err
    change = json.loads((run / "config_changes.jsonl").read_text())
    assert change["step"] == 20
    assert change["changes"] == [{"field": "optimizer.total_steps", "old": 20, "new": 22}]
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["total_steps"] == 22
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 22 and 21 in steps


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small(tmp_path / "run", optimizer={"total_steps": 1})))
    assert main(["train", str(cfg), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "--resume: no checkpoint in" in captured.err and "starting from step 0" in captured.err
    assert "model: " in captured.out and (tmp_path / "run" / "model" / "model.json").is_file()
