"""Progress of a training loop: a bar on a terminal, plain log lines everywhere else.

Off a terminal (``mopd train CONFIG > log 2>&1``, the TPU/GPU launchers' logs) a line goes to
stderr every ``run.log_every`` steps or ``run.log_every_s`` seconds, whichever comes first, and
at the first and last step::

    [sft] step 40/200 (20%) | 812 samples/s | loss 0.4213 | lr 1.00e-03 | 0.079 s/step | ETA 13s

(``kl`` and ``reward`` join when the recipe logs them). On a terminal a tqdm bar carries the
same loss / kl / reward. The learning rate comes from ``lr_at``: the optimizer's own schedule.
"""

from __future__ import annotations

import math
import sys
import time

import optax

# Which flattened metric is the loss / KL / reward of a recipe (first present wins).
_LOSS = ("loss",)
_KL = ("kl", "kl_ref")
_REWARD = ("sample_reward", "reward", "teacher_reward")


def lr_schedule(ocfg):
    """The learning-rate schedule ``steps.make_optimizer`` builds (the same optax call)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if ocfg.warmup_steps else ocfg.lr, peak_value=ocfg.lr,
        warmup_steps=ocfg.warmup_steps, decay_steps=max(ocfg.total_steps, ocfg.warmup_steps + 1),
        end_value=ocfg.lr * ocfg.min_lr_ratio)


def lr_at(ocfg, updates_before: int) -> float:
    """Learning rate of the update after ``updates_before`` applied updates (optax's count)."""
    return float(lr_schedule(ocfg)(updates_before))


def fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _pick(metrics: dict, prefix: str, names) -> float | None:
    for n in names:
        v = metrics.get(f"{prefix}/{n}")
        if v is not None:
            return v
    return None


def headline(metrics: dict, prefix: str) -> dict[str, float]:
    """{'loss', 'kl', 'reward'} present in one step's flattened metrics."""
    out = {}
    for key, names in (("loss", _LOSS), ("kl", _KL), ("reward", _REWARD)):
        v = _pick(metrics, prefix, names)
        if v is not None and math.isfinite(v):
            out[key] = v
    return out


class RunProgress:
    """Progress of steps ``start+1 .. total``; ``update`` after each step, ``close`` at the end.

    ``tty`` (default: whether ``stream`` is a terminal) picks the bar over log lines.
    """

    def __init__(self, total: int, start: int, desc: str, *, every_steps: int = 0,
                 every_s: float = 60.0, stream=None, tty: bool | None = None,
                 enabled: bool = True):
        self.total, self.start, self.desc = total, start, desc
        self.stream = stream or sys.stderr
        n = max(total - start, 1)
        self.every_steps = every_steps if every_steps > 0 else max(1, round(n / 20))
        self.every_s = every_s
        self.enabled = enabled
        self.tty = (self.stream.isatty() if tty is None else tty) and enabled
        self._t0 = time.perf_counter()
        self._t_first = None  # after the first step (compilation is in that one)
        self._first_step = start
        self._last_line_t = self._t0
        self._last_line_step = None
        self._window = None  # (time, samples, step) of the last line
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step",
                             file=self.stream, dynamic_ncols=True)

    def eta(self, step: int, rate: float) -> float:
        return (self.total - step) / rate if rate > 0 else math.inf

    def update(self, step: int, metrics: dict, prefix: str, samples: float,
               lr: float | None = None, step_s: float | None = None) -> None:
        """After ``step`` (1-based): ``metrics`` are the latest flushed ones (one step late)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first, self._first_step = now, step - 1
            self._window = (now, samples, step)
        head = headline(metrics, prefix)
        if self._bar is not None:
            if head:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in head.items()}, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        due = (step == self.start + 1 or step >= self.total
               or step - (self._last_line_step or self.start) >= self.every_steps
               or now - self._last_line_t >= self.every_s)
        if not due:
            return
        parts = [f"[{self.desc}] step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        rate = 0.0
        if step > self._first_step + 1:  # the first step compiles: rates start after it
            # over the steps since the last line (or since the first step)
            t_ref, s_ref, n_ref = self._window
            dt = max(now - t_ref, 1e-9)
            rate = (step - n_ref) / dt
            parts.append(f"{(samples - s_ref) / dt:.1f} samples/s")
        self._last_line_t, self._last_line_step = now, step
        self._window = (now, samples, step)
        parts += [f"{k} {v:.4g}" for k, v in head.items()]
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if step_s is not None:
            parts.append(f"{step_s:.3g} s/step")
        if step >= self.total:
            parts.append("done")
        elif step == self._first_step + 1:
            parts.append("first step (compiles); ETA from the next line")
        else:
            parts.append(f"ETA {fmt_duration(self.eta(step, rate))}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line between progress lines (an evaluation, a warning)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
