"""Benchmarks behind ``mopd bench``: each prints a ratio against a reference run in-process."""

import time


def best_time(fn, iters):
    """(fastest wall time in seconds over ``iters`` calls of ``fn``, the last result)."""
    best, out = float("inf"), None
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
