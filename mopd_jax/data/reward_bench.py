"""Reward throughput: code candidates scored per second by ``score_batch``, per test style and
sandbox isolation (a markdown table on stdout).

    python -m mopd_jax.data.reward_bench [--n 48] [--workers 2] [--isolation none,unshare,bwrap]

Half the candidates are right, half wrong; each figure is the best of ``--repeats`` batches.
It measures whatever ``mopd_jax`` it imports, so the same file times an older checkout:
``PYTHONPATH=OLD python mopd_jax/data/reward_bench.py --styles assert --isolation none``
(styles and isolation modes that checkout lacks are skipped).
"""

from __future__ import annotations

import argparse
import time

RIGHT = ("def add(a, b):\n    return a + b\n\n"
         "if __name__ == '__main__':\n    print(add(*map(int, input().split())))\n")
WRONG = "def add(a, b):\n    return a - b\n\nif __name__ == '__main__':\n    print(0)\n"
STYLES = {
    "assert": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"],
    "call": [{"call": f"add({a}, {b})", "expected": a + b} for a, b in ((2, 3), (-1, 2),
                                                                        (7, 8), (1, 5))],
    "stdin": [{"stdin": f"{a} {b}\n", "stdout": f"{a + b}\n"} for a, b in ((2, 3), (-1, 2),
                                                                          (7, 8))],
}


def measure(style: str, isolation: str | None, n: int, workers: int, repeats: int) -> float:
    from mopd_jax.data import rewards

    if isolation is not None:
        rewards.configure(isolation=isolation)
    record = dict(prompt="add", domain="code", reward="code", tests=STYLES[style])
    responses = [f"```python\n{RIGHT if i % 2 == 0 else WRONG}```" for i in range(n)]
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    best = float("inf")
    rewards.score_batch(responses[:2], [record] * 2, max_workers=workers)  # warm caches
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = rewards.score_batch(responses, [record] * n, max_workers=workers)
        best = min(best, time.perf_counter() - t0)
        if list(scores) != expected:
            raise SystemExit(f"{style}/{isolation}: wrong scores {list(scores)[:6]}...")
    return n / best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="candidates per batch")
    p.add_argument("--workers", type=int, default=2, help="score_batch threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--styles", default=",".join(STYLES))
    p.add_argument("--isolation", default="none,unshare,bwrap")
    args = p.parse_args(argv)
    from mopd_jax.data import rewards

    new = hasattr(rewards, "configure")
    modes = args.isolation.split(",") if new else [None]
    print(f"| style | isolation | candidates/s ({args.workers} workers, n={args.n}) |\n"
          "|---|---|---|")
    for style in args.styles.split(","):
        if not new and style != "assert":
            continue
        for mode in modes:
            if mode is not None:
                from mopd_jax.data import isolation as iso, sandbox

                try:
                    sandbox.resolve(mode)
                except iso.IsolationError as e:
                    print(f"| {style} | {mode} | unavailable: {str(e)[:60]} |")
                    continue
            rate = measure(style, mode, args.n, args.workers, args.repeats)
            print(f"| {style} | {mode or 'in-process harness'} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
