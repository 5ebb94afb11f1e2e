"""``mopd compile-check CONFIG --topology v5p-64``: does a config fit its accelerators, and how
fast could its step go? Answered ahead of time, without the accelerators.

The MOPD recipe's three compiled steps are lowered and compiled for the target exactly as the
recipe builds them (``recipes.common.compile_train_step`` with the recipe's loss config, the
jitted ``steps.score_step``, the engine's ``generate``), on ``jax.ShapeDtypeStruct`` arguments
that carry the run's shardings on the target's mesh: no weight is ever materialised.

* TPU targets compile with libtpu's compile-only devices (``jax[tpu]`` installed, no TPU
  attached). XLA:TPU refuses a program over its HBM; that refusal is the "does not fit" answer.
* GPU targets (``h100``, ``h200``; ``h100-N`` with N host devices) compile for the host CPU as a
  proxy: buffer sizes are the CPU compiler's, compared with the GPU's memory.

Per device it prints XLA's ``memory_analysis()`` (arguments, outputs, donated aliases, temps,
code) plus the buffers that stay live beside each step without being its arguments (train
state, pi_0, resident teachers), against the chip's HBM; and FLOPs (``mopd_jax.flops``): the
analytic model count (causal attention as the pairs a query sees, MoE by its active experts)
beside the matmul FLOPs of the compiled HLO, every loop body counted once per trip (XLA's own
``cost_analysis()`` counts it once: a layer scan or the microbatch loop undercounts there) and
Pallas kernels by the cost estimate they hand XLA (megablox) or from their operands (splash,
which hands none: causal pairs, each kernel's matmuls). Times are
lower bounds: FLOPs at the chip's peak, bytes at its HBM bandwidth, whichever is longer.
Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

from mopd_jax import estimators
from mopd_jax.errors import UsageError

GiB = 2**30
STEPS = ("train", "score", "decode")


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. Sources: Cloud TPU system-architecture pages (cloud.google.com/tpu/
    docs/v4, v5e, v5p, v6e: peak bf16 FLOP/s, HBM size and bandwidth per chip) and NVIDIA's
    H100/H200 SXM datasheets (dense bf16). ``hbm_gib`` is what XLA:TPU (libtpu 0.0.42.1) reports
    as available HBM; for GPUs the datasheet size."""

    kind: str
    hbm_gib: float
    peak_flops: float  # bf16, dense, per chip
    hbm_bw: float  # bytes/s per chip
    cores_per_chip: int = 1  # TensorCores counted in the accelerator name (v4-8 = 4 chips)
    topology_prefix: str = ""  # libtpu topology name prefix; '' = GPU, compiled on CPU
    chip_config: str = "default"
    datasheet: str = ""


CHIPS = {
    "v4": Chip("TPU v4", 30.75, 275e12, 1200e9, 2, "v4", "megacore", "32 GiB HBM2, 1200 GB/s"),
    "v5e": Chip("TPU v5e", 15.75, 197e12, 819e9, 1, "v5e", "default", "16 GB HBM2, 819 GB/s"),
    "v5p": Chip("TPU v5p", 95.74, 459e12, 2765e9, 2, "v5", "megacore", "95 GB HBM2e, 2765 GB/s"),
    "v6e": Chip("TPU v6e", 31.25, 918e12, 1640e9, 1, "v6e", "default", "32 GB HBM, 1640 GB/s"),
    "h100": Chip("NVIDIA H100 SXM", 80.0, 989e12, 3350e9, datasheet="80 GB HBM3, 3.35 TB/s"),
    "h200": Chip("NVIDIA H200 SXM", 141.0, 989e12, 4800e9, datasheet="141 GB HBM3e, 4.8 TB/s"),
}
# Chips -> slice shape, as Cloud TPU names them (3D tori for v4/v5p, 2D for v5e/v6e).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}


class CompileCheckError(UsageError):
    """Bad --topology, or no compiler for it (libtpu); ``mopd`` prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    chips: int
    shape: tuple[int, ...] = ()
    accelerator: str = ""  # Cloud TPU accelerator type, e.g. v5p-64

    @property
    def proxy(self) -> bool:
        return not self.chip.topology_prefix

    @property
    def topology(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"


def _topology_help() -> str:
    return ("use v5p-N or v4-N (N TensorCores = 2 per chip: v5p-8 is 4 chips, v5p-64 is 32 "
            f"chips; N in {sorted(2 * c for c in SHAPES_3D)}), v5e-N or v6e-N (N chips in "
            f"{sorted(SHAPES_2D)}), FAMILY:AxBxC for another slice shape (e.g. v5p:2x4x4), or "
            "h100 / h200 / h100-N (GPUs, compiled for the host CPU as a proxy)")


def parse_topology(name: str) -> Target:
    """``v5p-64`` -> 32 v5p chips in a 2x4x4 torus; ``v5p:4x4x2``; ``h100`` / ``h100-8``."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))?", text)
    chip = CHIPS.get(m.group(1)) if m else None
    if chip is None:
        raise CompileCheckError(f"--topology {name!r}: unknown accelerator; {_topology_help()}")
    family, count, dims = m.group(1), m.group(2), m.group(3)
    if not chip.topology_prefix:
        if dims:
            raise CompileCheckError(f"--topology {name!r}: GPUs take a count (h100-8), not a "
                                    "shape")
        return Target(name, chip, int(count or 1))
    if dims:
        shape = tuple(int(d) for d in dims.split("x"))
        if len(shape) != (3 if chip.cores_per_chip == 2 else 2) or min(shape) < 1:
            raise CompileCheckError(f"--topology {name!r}: {family} slices are "
                                    f"{3 if chip.cores_per_chip == 2 else 2}-D; "
                                    f"{_topology_help()}")
        chips = math.prod(shape)
        return Target(name, chip, chips, shape, f"{family}-{chips * chip.cores_per_chip}")
    if count is None:
        raise CompileCheckError(f"--topology {name!r}: give a size, e.g. {family}-8; "
                                f"{_topology_help()}")
    n = int(count)
    chips, table = (n // 2, SHAPES_3D) if chip.cores_per_chip == 2 else (n, SHAPES_2D)
    if n % chip.cores_per_chip or chips not in table:
        raise CompileCheckError(f"--topology {name!r}: no standard {family} slice of that size; "
                                f"{_topology_help()}")
    return Target(name, chip, chips, table[chips], f"{family}-{n}")


def target_devices(target: Target) -> list:
    """The target's devices: libtpu compile-only TPU devices, or host CPU devices (proxy)."""
    import jax

    if target.proxy:
        cpus = jax.devices("cpu")
        if len(cpus) < target.chips:
            raise CompileCheckError(
                f"--topology {target.name}: the CPU proxy needs {target.chips} host devices, "
                f"this process has {len(cpus)}; run with XLA_FLAGS="
                f"--xla_force_host_platform_device_count={target.chips}")
        return cpus[:target.chips]
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise CompileCheckError(f"--topology {target.name}: compiling for TPU needs libtpu; "
                                "pip install 'jax[tpu]==0.10.2' (libtpu 0.0.42.1; no TPU needed)")
    # libtpu without a TPU VM: no metadata server, no worker list; and another process on this
    # machine may hold libtpu's lock file (which only guards real chips).
    for k, v in {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
                 "TPU_WORKER_HOSTNAMES": "localhost",
                 "TPU_ACCELERATOR_TYPE": target.accelerator}.items():
        os.environ.setdefault(k, v)
    from jax.experimental import topologies
    shape3 = tuple(target.shape) + (1,) * (3 - len(target.shape))
    wrap = tuple(d >= 4 and min(target.shape) >= 4 for d in shape3) if len(target.shape) == 3 \
        else tuple(d == 16 for d in shape3[:2]) + (False,)
    return topologies.get_topology_desc(
        topology_name=target.topology, platform="tpu", chip_config_name=target.chip.chip_config,
        chips_per_host_bounds=tuple(min(d, b) for d, b in zip(shape3, (2, 2, 1))),
        num_slices=1, wrap=wrap).devices


# ----------------------------------------------------------------------------- abstract state
def _sds(x, sharding=None):
    return __import__("jax").ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_params(model_cfg, mesh, role: str):
    """(graphdef, params): an nnx State of ShapeDtypeStructs in ``role``'s layout, as
    ``loading.load_model`` would restore it; nothing allocated."""
    from flax import nnx

    from mopd_jax.checkpoint import abstract_model, abstract_with_shardings
    graphdef, state = abstract_model(model_cfg)
    nnx.replace_by_pure_dict(state, abstract_with_shardings(state, mesh, role))
    return graphdef, state


def abstract_train_state(params, optimizer, mesh) -> dict:
    """The abstract twin of ``steps.init_train_state(params, optimizer, mesh)``: moments take
    the param shardings, counts and scalars are replicated."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    opt_abs = jax.eval_shape(optimizer.init, params)
    shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, opt_abs, jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: replicated)
    opt_state = jax.tree.map(_sds, opt_abs, shardings)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return {"params": params, "opt_state": opt_state, "step": scalar, "skipped": scalar}


def device_bytes(tree, n_dev: int = 1) -> float:
    """Bytes one device holds of a pytree of ShapeDtypeStructs: a shard of a sharded one, 1 /
    ``n_dev`` of one whose layout the compiler picks."""
    import jax
    total = 0.0
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "dtype"):
            continue
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize / (1 if sharding is not None else n_dev)
    return total


# ----------------------------------------------------------------------------- compiling
_OOM = re.compile(r"(?:required[^(]*\(([\d.]+)([KMGT])\)[^(]*available HBM \(([\d.]+)([KMGT])\))"
                  r"|(?:Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm)", re.S)
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_oom(msg: str):
    """(required, available) bytes from an XLA:TPU out-of-HBM refusal, or None."""
    m = _OOM.search(msg)
    g = [x for x in m.groups() if x is not None] if m else []
    return (float(g[0]) * _UNIT[g[1]], float(g[2]) * _UNIT[g[3]]) if g else None


def compile_step(name: str, jitted, args, kwargs=None, *, n_dev: int,
                 loop_trips: int = 1, hlo_dir: str | None = None) -> dict:
    """Lower and compile ``jitted(*args)``; memory and cost analysis per device (and the
    compiled HLO text written to ``hlo_dir/<name>.hlo.txt`` when given)."""
    from jax.errors import JaxRuntimeError

    t0 = time.perf_counter()
    print(f"compile-check: compiling {name} step ...", file=sys.stderr, flush=True)
    lowered = jitted.lower(*args, **(kwargs or {}))
    try:
        compiled = lowered.compile()
    except JaxRuntimeError as e:
        oom = _parse_oom(str(e)) if "RESOURCE_EXHAUSTED" in str(e) else None
        if oom is None:
            raise
        first = str(e).strip().splitlines()[0]
        return {"step": name, "compiled": False, "compile_s": time.perf_counter() - t0,
                "xla_required_bytes": oom[0], "xla_available_bytes": oom[1],
                "xla_error": first[:400], "argument_estimate": device_bytes(args, n_dev)}
    mem = compiled.memory_analysis()
    m = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
    from mopd_jax import flops
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    hlo = flops.hlo_flops(text)
    cost = compiled.cost_analysis() or {}
    return {"step": name, "compiled": True, "compile_s": time.perf_counter() - t0, **m,
            "xla_bytes": m["argument"] + m["output"] - m["alias"] + m["temp"]
            + m["generated_code"],
            "xla_flops": hlo["flops"], "cost_analysis_flops": flops.cost_analysis_flops(compiled),
            "hlo_flops_by_kind": {k: hlo[k] for k in ("dot", "conv", "custom_call")},
            "hlo_loops": [t for _, t in hlo["loops"]],
            "unknown_trip_loops": len(hlo["unknown_trips"]),
            "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)) * loop_trips,
            "loop_trips": loop_trips}


def _domains(cfg) -> tuple[str, ...]:
    names = set(cfg.data.weights) | set(cfg.mopd.teachers) | set(cfg.data.builtin)
    return tuple(sorted(names)) or ("default",)


def default_score_rows(cfg, batch: int) -> int:
    """Rows of one teacher call: ``mopd.score_rows`` when set, else the pool pads each
    teacher's rows to a power of two (>= 8); its share of the batch is the largest domain
    weight (equal shares when none are set)."""
    if cfg.mopd.score_rows:
        return cfg.mopd.score_rows
    w = {d: cfg.data.weights.get(d, 0.0) for d in _domains(cfg)} if cfg.data.weights else {}
    share = max(w.values()) / sum(w.values()) if w else 1 / len(_domains(cfg))
    rows, b = math.ceil(batch * share), 8
    while b < rows:
        b *= 2
    return b


def build_and_compile(cfg, target: Target, steps=STEPS, score_rows: int | None = None,
                      hlo_dir: str | None = None) -> dict:
    """Compile ``steps`` of the config's MOPD recipe for ``target``; the report as a dict."""
    import jax
    import jax.numpy as jnp

    from mopd_jax import sharding as shd
    from mopd_jax import flops
    from mopd_jax.flops import active_matmul_params
    from mopd_jax.config import ConfigError
    from mopd_jax.recipes import common
    from mopd_jax.sampling import Engine
    from mopd_jax.batches import MOPDBatch
    from mopd_jax.estimators import DistillLossConfig
    from mopd_jax.steps import distill_objective, make_optimizer, make_train_step, score_step

    if cfg.run.recipe != "mopd":
        raise ConfigError(f"run.recipe: compile-check builds the mopd recipe's steps; got "
                          f"{cfg.run.recipe!r}; set run.recipe=mopd")
    mesh = shd.make_mesh(cfg.mesh, devices=target_devices(target))
    mcfg, m = cfg.model, cfg.mopd
    B, T = m.prompts_per_step * m.samples_per_prompt, common.seq_len(cfg)
    k = cfg.optimizer.microbatches
    if B % k:
        raise ConfigError(f"optimizer.microbatches={k} must divide the batch of "
                          f"mopd.prompts_per_step x samples_per_prompt = {B}")
    rows = score_rows or default_score_rows(cfg, B)
    named = sorted({t for t in m.teachers.values()} | ({m.fallback} if m.fallback else set()))
    n_resident = sum(t != "self" for t in named) if m.placement == "resident" else 0

    graphdef, params = abstract_params(mcfg, mesh, "train")
    loss_cfg = DistillLossConfig.from_mopd(m, _domains(cfg), vocab_size=mcfg.vocab_size,
                                           temperature=cfg.rollout.temperature)
    opt = make_optimizer(cfg.optimizer)
    state = abstract_train_state(params, opt, mesh)
    t_role = "teacher" if any(t != "self" for t in named) else "train"
    _, t_params = abstract_params(mcfg, mesh, t_role)
    live = {"train_state": device_bytes(state), "pi_0": device_bytes(params),
            "teacher": device_bytes(t_params) * (n_resident > 0)}
    c = target.chip
    report = {"target": {"name": target.name, "kind": c.kind, "chips": target.chips,
                         "topology": None if target.proxy else target.topology,
                         "hbm_gib": c.hbm_gib, "peak_flops": c.peak_flops, "hbm_bw": c.hbm_bw,
                         "datasheet": c.datasheet, "compiled_for": "host CPU (proxy)"
                         if target.proxy else "TPU (libtpu, compile-only)"},
              "model": {"name": mcfg.name, "params": mcfg.num_params(),
                        "active_params": active_matmul_params(mcfg),
                        "layers": mcfg.num_layers, "param_dtype": mcfg.param_dtype},
              "mesh": dict(mesh.shape), "batch": B, "seq": T, "microbatches": k,
              "score_rows": rows, "teachers_resident": n_resident, "slots": cfg.rollout.slots,
              "max_new_tokens": cfg.rollout.max_new_tokens, "estimator": m.estimator,
              "live_bytes": live, "steps": {}}
    others = {"train": live["pi_0"] + n_resident * live["teacher"],
              "score": live["train_state"] + live["pi_0"]
              + max(n_resident - 1, 0) * live["teacher"],
              "decode": live["train_state"] + live["pi_0"] + n_resident * live["teacher"]}

    def score_fn(p, tokens):
        return score_step(graphdef, p, tokens, loss_cfg=loss_cfg, mesh=mesh)

    n_dev = mesh.size
    for name in steps:
        if name == "train":
            i32, f32 = jnp.int32, jnp.float32
            sds = jax.ShapeDtypeStruct
            teacher = jax.eval_shape(score_fn, t_params, sds((B, T), i32))
            teacher = jax.tree.map(lambda x: sds(x.shape, x.dtype), teacher)
            stacked = estimators.get(m.estimator).stacked  # the pool stacks these per teacher
            if stacked:
                M = max(len(named), 1)
                teacher = teacher._replace(
                    teacher_index_B=sds((B,), i32),
                    **{f: sds((M, *getattr(teacher, f).shape), getattr(teacher, f).dtype)
                       for f in stacked})
            batch = MOPDBatch(tokens_BT=sds((B, T), i32), mask_BT=sds((B, T), i32),
                              domain_B=sds((B,), i32), sampler_logp_BT=sds((B, T), f32),
                              teacher=teacher, reward_B=sds((B,), f32),
                              orm_adv_B=sds((B,), f32) if m.samples_per_prompt >= 2 else None)
            step = make_train_step(graphdef, opt, distill_objective(
                loss_cfg, aux_coef=mcfg.router_aux_loss_coef), microbatches=k, mesh=mesh)
            r = compile_step("train", step, (state, batch), n_dev=n_dev, loop_trips=k,
                             hlo_dir=hlo_dir)
            r["model_flops"] = flops.train_flops(mcfg, B, T - 1)
        elif name == "score":
            tokens = jax.ShapeDtypeStruct((rows, T), jnp.int32)
            r = compile_step("score", score_step, (graphdef, t_params, tokens),
                             {"loss_cfg": loss_cfg, "mesh": mesh}, n_dev=n_dev, hlo_dir=hlo_dir)
            r["model_flops"] = flops.forward_flops(mcfg, rows, T - 1)
        else:
            _, s_params = abstract_params(mcfg, mesh, "sample")
            engine = Engine(graphdef, s_params, max_concurrent_decodes=cfg.rollout.slots,
                            max_prefill_length=cfg.data.max_prompt_len, max_target_length=T,
                            mesh=mesh)
            dstate = jax.eval_shape(engine.init_decode_state)
            dstate = jax.tree.map(_sds, dstate, engine._state_shardings)
            # the engine's own jit: its donation and out_shardings are part of what is checked
            r = compile_step("decode", engine._generate_jit, (s_params, dstate), n_dev=n_dev,
                             hlo_dir=hlo_dir)
            r["model_flops"] = flops.decode_flops(mcfg, cfg.rollout.slots, T)
        r["other_live_bytes"] = others[name]
        report["steps"][name] = _judge(r, target, n_dev)
    report["verdict"] = _verdict(report, target)
    report["estimate"] = _mopd_step_estimate(report, cfg)
    return report


def _judge(r: dict, target: Target, n_dev: int) -> dict:
    hbm = r.get("xla_available_bytes") or target.chip.hbm_gib * GiB
    need = (r["xla_bytes"] if r["compiled"] else r["xla_required_bytes"]) + r["other_live_bytes"]
    flops = max(r["model_flops"] / n_dev, r.get("xla_flops", 0.0))
    io = r["argument"] + r["output"] if r["compiled"] else r["argument_estimate"]
    moved = max(r.get("xla_bytes_accessed", 0.0), io)
    compute_s, hbm_s = flops / target.chip.peak_flops, moved / target.chip.hbm_bw
    return {**r, "need_bytes": need, "hbm_bytes": hbm, "fits": need <= hbm,
            "xla_over_model": r.get("xla_flops", 0.0) * n_dev / r["model_flops"],
            "over_bytes": max(need - hbm, 0), "flops_per_device": flops,
            "mfu_at_bound": r["model_flops"] / n_dev / target.chip.peak_flops
            / max(compute_s, hbm_s),
            "compute_s": compute_s, "hbm_s": hbm_s, "time_s": max(compute_s, hbm_s)}


def _verdict(report: dict, target: Target) -> dict:
    steps = report["steps"]
    worst = max(steps, key=lambda s: steps[s]["need_bytes"] - steps[s]["hbm_bytes"])
    over = {s: r["over_bytes"] / GiB for s, r in steps.items() if not r["fits"]}
    w = steps[worst]
    return {"fits": not over, "worst_step": worst, "worst_need_gib": w["need_bytes"] / GiB,
            "hbm_gib": w["hbm_bytes"] / GiB, "over_gib": over,
            "headroom_gib": (w["hbm_bytes"] - w["need_bytes"]) / GiB}


def _mopd_step_estimate(report: dict, cfg) -> dict:
    """One MOPD step at the per-step lower bounds: ceil(B / slots) waves of max_new_tokens
    decode steps, one score call per teacher, one train step (prefill not included)."""
    s = report["steps"]
    waves = math.ceil(report["batch"] / cfg.rollout.slots)
    calls = max(len(set(cfg.mopd.teachers.values())), 1)
    parts = {}
    if "decode" in s:
        parts["sample_s"] = s["decode"]["time_s"] * cfg.rollout.max_new_tokens * waves
    if "score" in s:
        parts["score_s"] = s["score"]["time_s"] * calls
    if "train" in s:
        parts["train_s"] = s["train"]["time_s"]
    return {**parts, "waves": waves, "score_calls": calls, "total_s": sum(parts.values())}




# ----------------------------------------------------------------------------- output
_LABEL = {"train": "train step", "score": "teacher score", "decode": "sampler decode"}


def _si(x: float, binary: bool = False) -> str:
    """3 significant digits and a unit prefix per cell: 50.5G, 163T (G = GiB when binary)."""
    base, prefixes = (1024.0, "KMGTP") if binary else (1000.0, "kMGTP")
    unit = ""
    for p in prefixes:
        if abs(x) < base * 0.9995:
            break
        x, unit = x / base, p
    return f"{x:.3g}{unit}" if x >= 100 else f"{x:.2f}{unit}" if x >= 10 else f"{x:.3f}{unit}"


def _size(b: float) -> str:
    return f"{b / 2**40:.2f} TiB" if b >= 2**40 else f"{b / GiB:.2f} GiB"


def _secs(s: float) -> str:
    return (f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else
            f"{s:.2f} s" if s < 600 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h")


def format_report(rep: dict, config: str) -> str:
    t, mo, v, steps = rep["target"], rep["model"], rep["verdict"], rep["steps"]
    where = (f"compiled for the host CPU as a proxy for {t['kind']} (memory and bytes moved "
             "are the CPU compiler's)" if t["topology"] is None else
             f"topology {t['topology']}, compiled by libtpu without a TPU")
    mb = rep["batch"] // rep["microbatches"]
    lines = [f"mopd compile-check {config} --topology {t['name']}",
             f"target   {t['name']}: {t['chips']} x {t['kind']}, {t['hbm_gib']:.2f} GiB HBM per "
             f"chip, {t['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {t['hbm_bw'] / 1e9:.0f} GB/s; "
             f"{where}",
             f"model    {mo['name']}: {mo['params'] / 1e9:.3f}B params "
             f"({mo['active_params'] / 1e9:.3f}B active per token), {mo['layers']} layers, "
             f"{mo['param_dtype']} params",
             "mesh     " + " ".join(f"{a}={n}" for a, n in rep["mesh"].items()),
             f"batch    {rep['batch']} rollouts x {rep['seq']} tokens, {rep['microbatches']} "
             f"microbatches of {mb}; estimator {rep['estimator']}; teacher calls of "
             f"{rep['score_rows']} rows, {rep['teachers_resident']} teacher(s) resident; decode "
             f"{rep['slots']} slots x {rep['seq']}-token KV cache", ""]
    g = lambda x: f"{_si(x, binary=True):>9}"  # noqa: E731
    lines.append(f"{'bytes per device':<16}" + "".join(f"{c:>9}" for c in (
        "args", "out", "alias", "temp", "code", "+live", "total", "HBM")) + "  verdict")
    for name, r in steps.items():
        cols = ("".join(g(r[k]) for k in ("argument", "output", "alias", "temp",
                                          "generated_code")) if r["compiled"] else
                f"{'XLA:TPU refused, needs ' + _si(r['xla_required_bytes'], binary=True):>45}")
        verdict = (f"fits, {_size(r['hbm_bytes'] - r['need_bytes'])} free" if r["fits"]
                   else f"DOES NOT FIT by {_size(r['over_bytes'])}")
        lines.append(f"{_LABEL[name]:<16}{cols}{g(r['other_live_bytes'])}{g(r['need_bytes'])}"
                     f"{g(r['hbm_bytes'])}  {verdict}")
    lines += ["  sizes in binary units (G = GiB); +live: buffers live beside the step that are "
              "not its arguments (train state, pi_0, resident teachers)", ""]
    lines.append(f"{'per call':<16}{'FLOP/dev':>10}{'model':>9}{'XLA':>9}{'XLA/model':>10}"
                 f"{'at peak':>11}{'bytes':>9}{'at HBM BW':>11}{'bound':>11}{'MFU':>6}"
                 f"{'compile':>9}")
    for name, r in steps.items():
        xla = (f"{_si(r['xla_flops']):>9}{r['xla_over_model']:9.2f}x" if r["compiled"]
               else f"{'-':>9}{'-':>10}")
        lines.append(f"{_LABEL[name]:<16}{_si(r['flops_per_device']):>10}"
                     f"{_si(r['model_flops'] / t['chips']):>9}{xla}{_secs(r['compute_s']):>11}"
                     f"{_si(r['hbm_s'] * t['hbm_bw']):>9}{_secs(r['hbm_s']):>11}"
                     f"{_secs(r['time_s']):>11}{r['mfu_at_bound']:6.0%}{r['compile_s']:8.0f}s")
    lines.append("  FLOP/dev = max(model / devices, XLA): the model count, or what XLA compiled "
                 "when that is more (replicated or dense work); XLA = matmul FLOPs of the "
                 "compiled HLO, loop bodies once per trip, Pallas kernels by their cost "
                 "estimates (splash from its operands); model: causal attention, active "
                 "experts; MFU = model FLOPs / (bound x peak)")
    e = rep["estimate"]
    if {"sample_s", "score_s", "train_s"} <= set(e):
        lines.append(f"mopd step >= {_secs(e['total_s'])}: sampling {_secs(e['sample_s'])} "
                     f"({e['waves']} waves x {rep['max_new_tokens']} decode steps), scoring "
                     f"{_secs(e['score_s'])} ({e['score_calls']} teacher calls), train "
                     f"{_secs(e['train_s'])}; a lower bound at peak, prefill not counted")
    lines.append("")
    if v["fits"]:
        lines.append(f"verdict  FITS on {t['name']}: the largest need is "
                     f"{v['worst_need_gib']:.2f} GiB per device ({_LABEL[v['worst_step']]}) of "
                     f"{v['hbm_gib']:.2f} GiB HBM, {v['headroom_gib']:.2f} GiB to spare")
    else:
        over = ", ".join(f"{_LABEL[s]} by {_size(g * GiB)}" for s, g in v["over_gib"].items())
        lines.append(f"verdict  DOES NOT FIT on {t['name']}: over the {v['hbm_gib']:.2f} GiB "
                     f"HBM per device: {over}")
    return "\n".join(lines)


def run(args) -> None:
    from mopd_jax.config import load_config

    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise UsageError(f"--steps {args.steps!r}: choose from {','.join(STEPS)}")
    if args.score_rows is not None and args.score_rows < 1:
        raise UsageError(f"--score-rows: must be >= 1, got {args.score_rows}")
    target = parse_topology(args.topology)
    rep = build_and_compile(load_config(args.config, args.set), target, steps, args.score_rows,
                            args.hlo_dir)
    print(json.dumps(rep, indent=1) if args.json else format_report(rep, args.config))
    if not rep["verdict"]["fits"]:
        sys.exit(1)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compile-check", help="compile a config's steps for a TPU/GPU target "
                       "without one: memory per device, FLOPs, time at peak, fits or not",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--topology", required=True,
                   help="target: v5p-64, v5e-16, v6e-8, v4-32, v5p:2x4x4, h100, h200, h100-8")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="config override, e.g. --set optimizer.microbatches=128 (repeatable)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help="which steps to compile (default: train,score,decode)")
    p.add_argument("--score-rows", type=int, default=None, metavar="N",
                   help="rows of one teacher call (default: the pool's bucket for the largest "
                        "domain share of the batch)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--hlo-dir", default=None, metavar="DIR",
                   help="also write each compiled step's HLO text to DIR/<step>.hlo.txt")
    p.set_defaults(run=run)
    return p
