"""Benchmarks behind ``mopd bench``: ours against a reference, both measured in one process.

Every verb prints its environment first (``environment``: CPU, cores, XLA's and torch's thread
counts, versions, load average) and times ours and the reference *interleaved* (``interleaved``:
ours, ref, ours, ref, ...; garbage collected before and the collector paused during each
call), so a change of load during the run hits both alike; figures are the median and min-max
over the rounds (``spread``), the ratio taken round by round.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import glob
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Mapping, Sequence


def best_time(fn, iters):
    """(fastest wall time in seconds over ``iters`` calls of ``fn``, the last result)."""
    best, out = float("inf"), None
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, clock=time.perf_counter,
                gap_s: float = 0.2) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Call every fn once per round, in the mapping's order, for ``rounds`` rounds.

    Returns ({name: seconds of each call}, {name: result of each call}). Alternating the
    contenders (rather than all of ours, then all of theirs) makes a ratio taken round by round
    fair on a machine whose load drifts. Before each call the garbage is collected and the
    collector is paused until it returns (as ``timeit`` does: otherwise one contender's
    garbage is collected in the other's time), and the call waits ``gap_s`` untimed, so that
    threads the previous contender left spinning (OpenMP's, Eigen's) have gone to sleep.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, list[Any]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            if gap_s:
                time.sleep(gap_s)
            gc.disable()
            try:
                t0 = clock()
                results[name].append(fn())
                times[name].append(clock() - t0)
            finally:
                gc.enable()
    return times, results


def spread(xs: Sequence[float]) -> dict[str, float]:
    """{'median', 'min', 'max', 'n'} of a sample (JSON-ready)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("spread: no measurements")
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Round-by-round ``num[i] / den[i]`` (e.g. reference seconds / our seconds = our speed-up)."""
    if len(num) != len(den):
        raise ValueError(f"ratios: {len(num)} vs {len(den)} rounds")
    return [n / d for n, d in zip(num, den)]


def scaled(s: Mapping[str, float], factor: float) -> dict[str, float]:
    """A spread with median/min/max multiplied by ``factor`` (min and max swap if negative)."""
    lo, hi = sorted((s["min"] * factor, s["max"] * factor))
    return {"median": s["median"] * factor, "min": lo, "max": hi, "n": s["n"]}


def inverse(s: Mapping[str, float], numerator: float = 1.0) -> dict[str, float]:
    """``numerator / x`` of a spread of positive x (seconds -> rate): min and max swap."""
    return {"median": numerator / s["median"], "min": numerator / s["max"],
            "max": numerator / s["min"], "n": s["n"]}


def fmt(s: Mapping[str, float] | None, spec: str = ".1f", unit: str = "") -> str:
    """'8.3 (8.1-8.6)' for a spread; the range is left out of a single measurement."""
    if s is None:
        return "-"
    med = f"{s['median']:{spec}}{unit}"
    if s.get("n", 1) <= 1 or s["min"] == s["max"]:
        return med
    return f"{med} ({s['min']:{spec}}–{s['max']:{spec}})"


# ------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _xla_threads() -> int | None:
    """Threads of XLA:CPU's intra-op pool (named ``tf_XLAEigen``), counted after a computation
    has run; None where /proc is not there to count them."""
    import jax
    import jax.numpy as jnp
    jax.block_until_ready(jnp.ones((64, 64)) @ jnp.ones((64, 64)))
    names = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/comm"):
        try:
            with open(path) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    n = sum(name.endswith("XLAEigen") for name in names)
    return n or None


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty",
                              "--abbrev=7"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def equal_threads():
    """Within this context torch has as many intra-op threads as XLA:CPU's pool (both default
    to the usable cores, but OMP_NUM_THREADS or fake host devices change either); yields that
    count and restores torch's own afterwards."""
    n = _xla_threads() or len(os.sched_getaffinity(0))
    try:
        import torch
    except ImportError:
        yield n
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def environment() -> dict:
    """What a figure depends on: CPU, cores, thread counts, versions, flags, load, date, commit."""
    import jax
    device = jax.devices()[0]
    try:
        import torch
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git_commit(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
        "xla_threads": _xla_threads(),
        "torch_threads": torch_threads,
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "torch", "transformers")},
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def format_environment(env: Mapping) -> str:
    """One line: the environment as ``environment()`` records it."""
    versions = " ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    load = " ".join(f"{x:.2f}" for x in env["load"])
    flags = f"XLA_FLAGS='{env['xla_flags']}'" if env["xla_flags"] else "XLA_FLAGS unset"
    torch = env["torch_threads"] if env["torch_threads"] is not None else "-"
    return (f"{env['cpu']}, {env['cores']} cores ({env['usable_cores']} usable), "
            f"{env['device']}; threads: XLA {env['xla_threads']}, torch {torch}; "
            f"python {env['python']} {versions}; {flags}; load average {load}; "
            f"{env['date']}, git {env['git'] or '?'}")


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process and its children), for
    ``other_cores``; None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user already
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_cores(start, end) -> float | None:
    """Cores that *other* processes kept busy, on average, between two ``cpu_snapshot``s: the
    load a run competed with (0 on an idle machine)."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def print_environment() -> dict:
    """``environment()``, printed first by every bench verb; returned for the JSON."""
    env = environment()
    print(f"environment: {format_environment(env)}", flush=True)
    return env
