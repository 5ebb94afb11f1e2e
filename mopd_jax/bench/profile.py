"""Where a compiled step's time goes: a ``jax.profiler`` trace joined with the compiled HLO.

XLA:CPU records one trace event per executed thunk (a fusion, a dot, a library call such as
a YNNPACK fusion) on its worker threads, named after the HLO instruction. ``op_profile`` runs
a step a few times under the profiler, maps every event to its instruction in the compiled
module's text and sums the events per *kind* of work: a matmul by its operand shapes and
backend ('ynn' YNNPACK fusion, 'eigen' XLA's own dot), anything else by opcode, source op and
output shape. Times are thread time (summed over XLA's threads; concurrent thunks overlap), so
the shares, not the absolute figures, are what compares with the step's wall time.
"""

from __future__ import annotations

import collections
import glob
import math
import re
import tempfile
from typing import Callable

import jax

_INST = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)$", re.M)
_COMP = re.compile(r"^%([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)\n\}", re.M | re.S)
_DIMS = re.compile(r"\[([0-9,]*)\]")


def _dims(shape: str) -> list[int]:
    m = _DIMS.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _clean(shape: str) -> str:
    return re.sub(r"\{[^}]*\}", "", shape)


class HloIndex:
    """Instructions of a compiled module's text: name -> what a trace event of it did."""

    def __init__(self, text: str):
        self.shape, self.inst = {}, {}
        for m in _INST.finditer(text):
            name, shape, op, rest = m.groups()
            self.shape[name] = _clean(shape)
            self.inst[name] = (op, rest)
        self.comps = {m.group(1): m.group(2) for m in _COMP.finditer(text)}

    def _operands(self, rest: str) -> list[str]:
        return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])

    def _dot(self, name: str, rest: str) -> tuple[str, float]:
        lhs, rhs = self._operands(rest)[:2]
        contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        lhs_dims = _dims(self.shape[lhs])
        k = math.prod(lhs_dims[int(i)] for i in contract.group(1).split(",") if i) \
            if contract else 1
        flops = 2.0 * math.prod(_dims(self.shape[name])) * k
        return f"{self.shape[lhs]} x {self.shape[rhs]} -> {self.shape[name]}", flops

    def describe(self, name: str) -> tuple[str, float] | None:
        """(kind of work, FLOPs for matmuls else 0) of instruction ``name``; None if unknown."""
        if name not in self.inst:
            return None
        op, rest = self.inst[name]
        meta = re.search(r'op_name="([^"]*)"', rest)
        source = meta.group(1).rsplit("/", 1)[-1] if meta else ""
        if op == "dot":
            what, flops = self._dot(name, rest)
            return f"matmul (eigen) {what}", flops
        if op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", rest)
            body = self.comps.get(called.group(1), "") if called else ""
            backend = "ynn" if "__ynn_fusion" in rest else "xla"
            for m in _INST.finditer(body):
                if m.group(3) == "dot":
                    inner = HloIndex(body)
                    what, flops = inner._dot(m.group(1), m.group(4))
                    return f"matmul ({backend}) {what}", flops
            kind = re.search(r"kind=(\w+)", rest)
            return f"{backend} {kind.group(1) if kind else 'fusion'} {source} -> " \
                   f"{self.shape[name]}", 0.0
        return f"{op} {source} -> {self.shape[name]}", 0.0


def op_profile(step: Callable[[], object], hlo_text: str, steps: int = 3) -> dict:
    """Trace ``steps`` calls of ``step`` (each must block until done) and sum XLA:CPU's thunk
    events by kind of work. Returns {'busy_ms': thread-ms per step, 'ops': [{op, ms, share,
    calls, gflop, gflop_s}, ...] largest first}; ``gflop_s`` is the matmul rate if it ran at
    its share of ``wall_ms`` (filled by the caller through ``with_wall``)."""
    index = HloIndex(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                step()
        path = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
        agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for plane in data.planes:
            for line in plane.lines:
                if "XLA" not in line.name:  # XLA:CPU's worker and client threads
                    continue
                for ev in line.events:
                    d = index.describe(ev.name)
                    if d is None:  # executor bookkeeping, waits
                        continue
                    a = agg[d[0]]
                    a[0] += 1
                    a[1] += ev.duration_ns / 1e6
                    a[2] += d[1]
    busy = sum(a[1] for a in agg.values()) / steps
    ops = [{"op": k, "ms": ms / steps, "share": ms / steps / busy if busy else 0.0,
            "calls": n / steps, "gflop": fl / steps / 1e9}
           for k, (n, ms, fl) in agg.items()]
    ops.sort(key=lambda r: -r["ms"])
    return {"busy_ms": busy, "steps": steps, "ops": ops}


def with_wall(prof: dict, wall_ms: float, top: int = 12) -> dict:
    """Keep the ``top`` kinds of work; give each its share of the step's wall time and, for
    matmuls, the GFLOP/s that implies."""
    ops = []
    for r in prof["ops"][:top]:
        r = dict(r, wall_ms=r["share"] * wall_ms)
        r["gflop_s"] = r["gflop"] / (r["wall_ms"] / 1e3) if r["gflop"] and r["wall_ms"] else None
        ops.append(r)
    rest = prof["ops"][top:]
    if rest:
        share = sum(r["share"] for r in rest)
        ops.append({"op": f"{len(rest)} other kinds", "ms": sum(r["ms"] for r in rest),
                    "share": share, "calls": sum(r["calls"] for r in rest),
                    "gflop": sum(r["gflop"] for r in rest), "wall_ms": share * wall_ms,
                    "gflop_s": None})
    return dict(prof, wall_ms=wall_ms, ops=ops)


def print_profile(prof: dict, title: str) -> None:
    print(f"  profile, {title}: {prof['wall_ms']:.1f} ms/step wall, {prof['busy_ms']:.1f} "
          f"thread-ms/step busy in XLA's threads ({prof['steps']} steps traced)")
    print(f"    {'share':>6} {'~wall ms':>9} {'calls':>6} {'GFLOP/s':>8}  kind of work")
    for r in prof["ops"]:
        rate = f"{r['gflop_s']:8.1f}" if r.get("gflop_s") else f"{'':8}"
        print(f"    {r['share']:6.1%} {r['wall_ms']:9.2f} {r['calls']:6.0f} {rate}  {r['op']}")
