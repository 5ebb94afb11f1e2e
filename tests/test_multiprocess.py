"""`mopd train` on 2 processes x 4 CPU devices reproduces 1 process x 8 devices.

The 2-process run is cut after step 2 (checkpoint, then exit) and resumed to step 3 with
``--resume``, so the checkpoint save and restore run multi-process too; the 1-process run goes
straight to step 3. Both are the real CLI a launch script starts on every host, with
``jax.distributed`` over localhost (gloo CPU collectives). Students and teachers are written
here as checkpoints (no random-init compile in the runs); each domain has its own non-trivial
teacher, so every gradient carries signal (a 'self' teacher makes step 1's update pure
rounding noise, which Adam's per-coordinate normalisation then amplifies).

Tolerance: the two runs compile different programs (cross-process all-reduces go through
gloo), so fp32 sums are reordered: ~1e-7 relative per reduction (measured worst: 6e-7 on the
metrics, 1.4e-6 absolute on a parameter after 3 Adam steps of lr 1e-3). ``FP32_ATOL`` (1e-5)
as both rtol and atol leaves ~10x margin; a real bug (a row lost, duplicated or taken from
the wrong process, a different batch or teacher) moves these values by 1e-3 or more.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from models.config import preset
from models import build
from mopd_jax.checkpoint import load_model_params, save_model
from mopd_jax.rollout_store import RolloutStore
from mopd_jax.sharding import make_mesh
from helpers import FP32_ATOL

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420  # per launch; a cold compile on a loaded 2-core machine is the slow part


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def started():
    """Every process the test starts; those still running at its end are killed."""
    procs = []
    yield procs
    for _, _, p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _launch(started: list, tmp: Path, tag: str, num_processes: int, *args: str) -> list:
    """``mopd train *args`` as ``num_processes`` processes sharing 8 CPU devices."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ)
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}")
        if num_processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       MOPD_NUM_PROCESSES=str(num_processes), MOPD_PROCESS_ID=str(i))
        log = tmp / f"{tag}.{i}"
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            procs.append((f"{tag} process {i}/{num_processes}", log, subprocess.Popen(
                [sys.executable, "-m", "mopd_jax.cli", "train", *args], cwd=ROOT, env=env,
                stdout=out, stderr=err)))
    started.extend(procs)
    return procs


def _wait(procs, timeout: float = TIMEOUT_S) -> list[str]:
    """Stderr of every process once all exit 0; on a failure or timeout, stop the rest (a
    survivor would block in a collective) and fail with every process's stderr."""
    deadline = time.monotonic() + timeout
    why = None
    while why is None and any(p.poll() is None for _, _, p in procs):
        why = next((f"{n} exited with {p.returncode}" for n, _, p in procs
                    if p.poll() not in (None, 0)), None)
        if why is None and time.monotonic() > deadline:
            why = f"timed out after {timeout:.0f} s"
        time.sleep(0.2)
    why = why or next((f"{n} exited with {p.returncode}" for n, _, p in procs
                       if p.returncode != 0), None)
    for _, _, p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    errs = [Path(f"{log}.err").read_text() for _, log, _ in procs]
    if why:
        report = "\n".join(f"----- {n} (exit {p.returncode}), stderr tail of {log}.err:\n"
                           f"{err[-4000:]}" for (n, log, p), err in zip(procs, errs))
        raise AssertionError(f"{why}\n{report}")
    return errs


def _checkpoints(tmp: Path) -> dict[str, str]:
    """pi_0 and one teacher per domain: tiny dense models over the built-in 32-symbol
    alphabet, random with different seeds (so every teacher disagrees with the student)."""
    cfg = preset("tiny", vocab_size=32)
    out = {}
    for name, seed in (("pi0", 3), ("teacher_add", 7), ("teacher_sort", 8)):
        out[name] = str(save_model(tmp / name, nnx.split(build(cfg, nnx.Rngs(seed)))[1],
                                   cfg))
    return out


def _config(tmp: Path, out: Path, ckpts: dict, total_steps: int) -> Path:
    cfg = {
        "run": {"name": "mp", "out_dir": str(out), "recipe": "mopd", "init": ckpts["pi0"],
                "seed": 3, "checkpoint_every": 2, "eval_every": 2},
        # the layer scan and blockwise attention on (issue 14), applied on top of run.init's
        # unrolled checkpoint (and the teachers'): both layouts meet here
        "model": {"preset": "tiny", "vocab_size": 32, "scan_layers": True,
                  "attention_impl": "blockwise"},
        "data": {"builtin": ["add", "sort"], "builtin_size": 32, "eval_size": 2,
                 "max_prompt_len": 16},
        "rollout": {"max_new_tokens": 4, "slots": 8},
        "mopd": {"prompts_per_step": 8,
                 "teachers": {"add": ckpts["teacher_add"], "sort": ckpts["teacher_sort"]}},
        # A constant learning rate: the schedule does not depend on total_steps, so a run cut
        # at step 2 and resumed to 3 must equal a run straight to 3. Adam's update moves by up
        # to lr/eps per unit of gradient rounding where a gradient nearly cancels: 1e5 with the
        # default eps=1e-8 (measured: 1.2e-5 on one parameter after 3 steps); eps=1e-6 keeps
        # that at 1e3, so every parameter compares at fp32 tolerance.
        "optimizer": {"lr": 1e-3, "eps": 1e-6, "warmup_steps": 0, "min_lr_ratio": 1.0,
                      "total_steps": total_steps},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _close(a, b, what: str) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=FP32_ATOL, atol=FP32_ATOL, err_msg=what)


def test_two_processes_match_one_process_with_resume(tmp_path, started):
    ckpts = _checkpoints(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    # The reference and the first half of the 2-process run share the two cores.
    ref = _launch(started, tmp_path, "1x8", 1, str(_config(tmp_path, one, ckpts, 3)))
    cut = _launch(started, tmp_path, "2x4-cut", 2, str(_config(tmp_path, two, ckpts, 2)))
    cut_errs = _wait(cut)
    ref_errs = _wait(ref)
    errs = _wait(_launch(started, tmp_path, "2x4-resume", 2,
                         str(_config(tmp_path, two, ckpts, 3)), "--resume",
                         "--allow-config-change"))
    # One run over all 8 devices (not two independent 4-device runs); process 0 prints.
    assert "(8 devices, 2 processes)" in cut_errs[0], cut_errs[0][-2000:]
    assert "(8 devices, 1 process)" in ref_errs[0], ref_errs[0][-2000:]
    assert "# mopd run" not in cut_errs[1], cut_errs[1][-2000:]
    for err in errs:
        assert f"resumed {two} at step 2" in err, err[-2000:]

    # Metrics: process 0 alone wrote them (no duplicate rows); same rows, values within fp32.
    want, got = _metrics(one), _metrics(two)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for w, g in zip(want, got):
        for k in w:
            _close(g[k], w[k], f"step {w['step']} {k}")
    assert json.loads((two / "eval.json").read_text()) == json.loads(
        (one / "eval.json").read_text())

    # Rollouts: the same prompts and sampled tokens at every step; log-probs within fp32.
    a, b = RolloutStore.open(one / "rollouts").read(), RolloutStore.open(two / "rollouts").read()
    for k in ("tokens", "prompt_len", "length", "step", "domain"):
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for k in ("sampler_logp", "teacher_logp", "reward"):
        _close(b[k], a[k], k)

    # Final params (saved by 2 processes, restored here onto one process's 8 devices).
    mesh = make_mesh()
    pa = nnx.to_pure_dict(load_model_params(one / "model", mesh)[2])
    pb = nnx.to_pure_dict(load_model_params(two / "model", mesh)[2])
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(pa)[0],
                                 jax.tree_util.tree_flatten_with_path(pb)[0]):
        _close(y, x, f"params{jax.tree_util.keystr(path)}")
