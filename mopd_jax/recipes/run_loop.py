"""The loop every recipe shares: ``train_loop(run, state, step_fn)``.

It owns what must be identical in every recipe: resume from the last good checkpoint (params,
optimizer, data iterator, step, the ``Loop`` state: samples consumed, first-step KL, and a
recipe's ``carry``: async MOPD's in-flight rollouts), SIGTERM/SIGINT -> save then exit,
metrics read one step late and written to metrics.jsonl + TensorBoard, the rollout store,
evaluation every ``run.eval_every`` steps, the sample budget's end and learning rate, and
progress with ETA.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from mopd_jax import config as cfgmod
from mopd_jax import run_dir
from mopd_jax import sharding as shd
from mopd_jax.metrics import MetricsWriter, NullWriter
from mopd_jax.progress import RunProgress, lr_at as schedule_lr_at
from mopd_jax.recipes.common import Loop, Run, _set_lr, evaluate, is_primary, lr_at


def _to_host(metrics: dict) -> dict:
    return shd.to_host(dict(metrics))


def flatten_metrics(prefix: str, metrics: dict, domains) -> dict[str, float]:
    """Scalars as-is; ``name/domain`` vectors [M] as ``name/<domain>``; under ``prefix/``."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if k.endswith("/domain"):
            base = k[: -len("/domain")]
            for i, d in enumerate(domains[: v.shape[0]]):
                out[f"{prefix}/{base}/{d}"] = float(v[i])
        elif v.ndim == 0:
            out[f"{prefix}/{k}"] = float(v)
    return out


def train_loop(run: Run, state, step_fn, *, pipeline, total_steps: int, resume: bool = False,
               prefix: str = "train", store=None, final_eval: bool = True, carry=None):
    """Run ``step_fn`` from the last checkpoint (or 0) to ``total_steps``; see module doc.

    ``step_fn(state, step, loop) -> (state, device_metrics, host_metrics, rows)``; ``rows`` is
    None or the kwargs of ``RolloutStore.append``. With ``optimizer.sample_budget`` the run
    ends at the first step after which that many samples are consumed (total_steps is a cap)
    and the learning rate follows ``lr_at``. ``carry`` (optional) is host state checkpointed
    with the run (``host_state() -> {name: np.ndarray} | None`` at every save,
    ``load_host_state(arrays | None, step)`` on resume): async MOPD's in-flight rollouts.
    Returns (final state, ``Loop``).
    """
    from mopd_jax.run_checkpoint import GracefulStop, RunCheckpointer, abstract_like

    cfg = run.cfg
    ckpt = RunCheckpointer(run.out / "checkpoints", max_to_keep=cfg.run.keep_checkpoints)
    start, loop = 0, Loop()
    try:  # refused unless --allow-config-change (mopd train checks this before any work)
        changes = run_dir.check_resume(cfg, run.out, resume)
    except run_dir.AlreadyFinished:
        loop.finished_before = True
        return state, loop
    if run.header:
        print(run.header, file=sys.stderr, flush=True)
    if resume and ckpt.latest_step() is not None:
        start, state, extra = ckpt.restore(abstract_like(state))
        pipeline.set_state(extra["data"])
        loop.samples.update(extra.get("samples", {}))
        loop.initial_kl.update(extra.get("initial_kl", {}))
        if carry is not None:
            carry.load_host_state(ckpt.restore_host(start), start)
        print(f"resumed {run.out} at step {start}", file=sys.stderr)
    elif resume and is_primary():
        print(f"--resume: no checkpoint in {run.out / 'checkpoints'}; starting from step 0",
              file=sys.stderr)
    run_dir.start(cfg, run.out, changes, start, is_primary())
    if store is not None:
        getattr(store, "create", lambda: None)()
        if start:
            store.truncate_to_step(start)
    writer = (MetricsWriter(run.out, resume_step=start if resume else None) if is_primary()
              else NullWriter())

    def save(step, state, force=False):
        ckpt.save(step, state, {"data": pipeline.get_state(), "step": step,
                                "samples": loop.samples, "initial_kl": loop.initial_kl,
                                "config": cfgmod.to_dict(cfg)}, force=force,
                  host=None if carry is None else carry.host_state())

    pending = None  # (step, device metrics, host metrics): fetched one step late
    last: dict = {}  # the latest flushed metrics (what the progress line shows)

    def flush():
        nonlocal pending, last
        if pending is not None:
            step, dev, host = pending
            last = {**flatten_metrics(prefix, _to_host(dev), run.domains), **host}
            if "optimizer/lr" not in last:  # optax's count: skipped (non-finite) steps excluded
                skipped = last.get(f"{prefix}/skipped_steps", 0.0)
                skipped -= 1.0 - last.get(f"{prefix}/finite", 1.0)
                last["optimizer/lr"] = schedule_lr_at(cfg.optimizer, int(step - 1 - skipped))
            writer.write(step, last)
            pending = None

    budget = cfg.optimizer.sample_budget  # samples: the run's end and its LR schedule

    def spent() -> bool:
        return bool(budget) and sum(loop.samples.values()) >= budget

    t0 = time.perf_counter()
    progress = RunProgress(total_steps, start, f"{cfg.run.name} {prefix}",
                           every_steps=cfg.run.log_every, every_s=cfg.run.log_every_s,
                           enabled=is_primary())
    samples0 = sum(loop.samples.values())
    t_step = time.perf_counter()
    with GracefulStop() as stop:
        step = start
        while step < total_steps and not spent():
            lr = None
            if budget:
                lr = lr_at(cfg.optimizer, step, sum(loop.samples.values()))
                state = _set_lr(state, lr)
            state, dev, host, rows = step_fn(state, step, loop)
            if lr is not None:
                host = {**host, "optimizer/lr": lr}
            flush()
            step += 1
            now = time.perf_counter()
            host = {**host, "time/step_s": now - t_step}
            t_step = now
            pending = (step, dev, host)
            if store is not None and rows is not None:
                store.append(step=step, **rows)
            if (cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total_steps
                    and not spent()):
                flush()
                scores = evaluate(run, state["params"])
                writer.write(step, {f"eval/{d}": s for d, s in scores.items()})
                progress.note(f"[{progress.desc}] eval at step {step}: "
                              + " | ".join(f"{d} {v:.4f}" for d, v in scores.items()))
            stopping = stop.requested_anywhere()  # every process stops at the same step
            if (step % cfg.run.checkpoint_every == 0 or step == total_steps or spent()
                    or stopping):
                flush()
                save(step, state, force=stopping)
            done = sum(loop.samples.values()) - samples0
            progress.update(step, last, prefix,
                            samples=done if done else (step - start) * pipeline.batch_size,
                            lr=last.get("optimizer/lr"), step_s=host["time/step_s"])
            if stopping:
                ckpt.wait()
                print(f"stopped by signal at step {step}; checkpoint saved in "
                      f"{run.out / 'checkpoints'}; continue with --resume", file=sys.stderr)
                break
    flush()
    progress.close()
    ckpt.wait()
    ckpt.close()
    finished = step == total_steps or spent()
    loop.finished_before = step == start and (run.out / "eval.json").is_file()
    if final_eval and finished and not loop.finished_before:
        scores = evaluate(run, state["params"])
        writer.write(step, {f"eval/{d}": s for d, s in scores.items()})
        if is_primary():
            (run.out / "eval.json").write_text(json.dumps(scores, indent=1))
    writer.close()
    loop.stopped = not finished
    loop.elapsed = time.perf_counter() - t0
    return state, loop
