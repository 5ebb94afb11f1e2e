"""libtpu installed (the test and tpu-aot extras) on a machine without TPU chips: `mopd` picks the
CPU without libtpu's initialisation errors, and `mopd compile-check` still compiles with libtpu.
The subprocesses run as a user would: JAX_PLATFORMS unset (tests/conftest.py sets it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mopd_jax import cli

ROOT = Path(__file__).resolve().parents[1]
# libtpu's start-up lines on a machine without TPUs: "Failed to find host bounds for accelerator
# type: WARNING: could not determine TPU accelerator type ...", "WARNING: Logging before
# InitGoogle() ...", "E0000 ... common_lib.cc:554] INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES".
NOISE = re.compile(r"tpu|InitGoogle|^[EWF]\d{4} ", re.IGNORECASE)

needs_libtpu_without_tpu = pytest.mark.skipif(
    not cli._libtpu_installed() or cli._machine_has_accelerator(),
    reason="the claim is about libtpu installed on a machine without TPU chips (or GPUs)")


def _user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    env["XLA_FLAGS"] = ""  # one CPU device, like a user's laptop
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _mopd(*args, timeout=120):
    script = Path(sys.executable).with_name("mopd")  # the console script, as a user runs it
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mopd_jax.cli"]
    p = subprocess.run(cmd + list(args), cwd=ROOT, env=_user_env(), capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if NOISE.search(line)]


def test_skip_absent_tpu_only_drops_tpu_where_jax_would_fall_back_to_cpu(monkeypatch):
    monkeypatch.setattr(cli, "_libtpu_installed", lambda: True)
    monkeypatch.setattr(cli, "_machine_has_accelerator", lambda: False)
    env = {}
    cli.skip_absent_tpu(env)
    assert env == {"JAX_PLATFORMS": "cpu"}
    for given in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "tpu"}, {"JAX_FORCE_TPU_INIT": "1"}):
        env = dict(given)
        cli.skip_absent_tpu(env)
        assert env == given  # the user's choice (JAX_PLATFORMS= is JAX's own auto-pick) stands
    monkeypatch.setattr(cli, "_machine_has_accelerator", lambda: True)  # TPU or GPU: JAX picks
    env = {}
    cli.skip_absent_tpu(env)
    assert env == {}
    monkeypatch.setattr(cli, "_machine_has_accelerator", lambda: False)
    monkeypatch.setattr(cli, "_libtpu_installed", lambda: False)  # no libtpu: no noise
    env = {}
    cli.skip_absent_tpu(env)
    assert env == {}


@needs_libtpu_without_tpu
def test_help_and_plain_jax_control():
    # Control: this machine's libtpu does print its errors when JAX starts without the fallback,
    # so their absence below is the fallback's doing.
    p = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                       env=_user_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "cpu", p.stderr[-2000:]
    assert _noise(p.stderr), "libtpu printed nothing without the fallback: control is void"

    rc, out, err = _mopd("--help")
    assert rc == 0 and "compile-check" in out
    assert _noise(err) == [], err[-2000:]


@needs_libtpu_without_tpu
def test_quick_demo_prints_no_libtpu_errors(tmp_path):
    rc, out, err = _mopd("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=900)
    assert rc == 0, err[-3000:]
    assert "mean normalised score" in out
    assert _noise(err) == [], "\n".join(_noise(err))[:3000]


@needs_libtpu_without_tpu
def test_compile_check_still_compiles_with_libtpu():
    rc, out, err = _mopd("compile-check", "configs/tiny.yaml", "--topology", "v5p-8",
                         "--steps", "score", timeout=300)
    assert rc == 0, err[-3000:]
    assert "compiled by libtpu without a TPU" in out
    assert _noise(err) == [], err[-2000:]
