"""FLOPs that tell the truth: the analytic model count, and the matmul FLOPs of a compiled HLO
module with every loop body counted once per trip.

Model FLOPs (PaLM appendix B, MaxText's conventions): ``2 * active matmul params`` per token
forward (the lm_head counts, the embedding lookup does not; an MoE layer counts its router and
its k active experts), ``2 * H * (Hd + Vd)`` per visible (query, key) pair (QK^T and PV: Hd + Vd
multiply-adds a head), and a train step is 3× the forward. Causal attention counts the pairs a
query can see: T(T+1)/2 per row, about half of full attention (MaxText's ``causal = full / 2``:
full is 4 * T^2 * H * Hd a row), a sliding window min(i+1, W) per query.

``hlo_flops(text)`` reads ``compiled.as_text()``: ``dot`` and ``convolution`` FLOPs from their
shapes, Pallas/Mosaic custom calls from the cost estimate the kernel hands XLA (megablox
``gmm``/``tgmm``), splash attention, which hands none, analytically from its operands (see
``_splash_flops``), each computation multiplied by how often it runs: a ``while`` body by its
known trip count (XLA's ``cost_analysis()`` counts a loop body once, so a layer ``scan`` or a
microbatch loop is undercounted by its trip count there), a fusion, call or branch once.
Elementwise work is not counted: the figure is comparable with the model count.
"""

from __future__ import annotations

import math
import re

import numpy as np

from models.config import ModelConfig


# ----------------------------------------------------------------------------- analytic
def active_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through: attention and MLP projections of every layer
    (router plus k experts in MoE layers) and the lm_head; no embedding lookup, no norms."""
    D, H, Hd, Vd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.value_dim
    total = D * cfg.vocab_size
    for i in range(cfg.num_layers):
        K = cfg.kv_heads(i)  # per layer: MiMo's sliding layers have their own KV heads
        total += D * (H + K) * Hd + D * K * Vd + H * Vd * D
        if cfg.is_moe_layer(i):
            k, F = cfg.num_experts_per_tok, cfg.moe_intermediate_size
            total += D * cfg.num_experts + 3 * k * D * F
        else:
            total += 3 * D * cfg.intermediate_size
    return total


def visible_pairs(T: int, window: int | None = None) -> int:
    """(query, key) pairs a causal row of T positions attends: T(T+1)/2, or with a sliding
    window W the sum over queries of min(i + 1, W)."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def _attn_per_pair(cfg: ModelConfig) -> int:
    return 2 * cfg.num_heads * (cfg.head_dim + cfg.value_dim)  # QK^T and PV, 2 FLOPs a MAC


def _window(cfg: ModelConfig, i: int):
    return cfg.sliding_window if cfg.layer_type(i) == "sliding" else None


def forward_flops(cfg: ModelConfig, B: int, T: int) -> float:
    """Forward FLOPs of B causal rows of T positions (prefill, teacher scoring)."""
    attn = sum(_attn_per_pair(cfg) * visible_pairs(T, _window(cfg, i))
               for i in range(cfg.num_layers))
    return float(B * (2 * active_matmul_params(cfg) * T + attn))


def train_flops(cfg: ModelConfig, B: int, T: int) -> float:
    """Forward + backward FLOPs of one training step on B causal rows of T positions."""
    return 3 * forward_flops(cfg, B, T)


def decode_flops(cfg: ModelConfig, tokens: int, context: int) -> float:
    """Forward FLOPs of ``tokens`` single-position rows each attending ``context`` keys."""
    attn = sum(_attn_per_pair(cfg) * (context if _window(cfg, i) is None
                                      else min(context, _window(cfg, i)))
               for i in range(cfg.num_layers))
    return float(tokens * (2 * active_matmul_params(cfg) + attn))


# ----------------------------------------------------------------------------- HLO
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_OPNAME = re.compile(r"\s*([\w\-]+)\((.*)$")


def _shape_and_op(rhs: str):
    """(shape text, opcode, text after the opening parenthesis) of an instruction's rhs."""
    if rhs.startswith("("):  # tuple shape: up to its matching parenthesis
        depth, i = 0, 0
        for i, ch in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rhs[:i + 1], rhs[i + 1:]
    else:
        shape, _, rest = rhs.partition(" ")
    m = _OPNAME.match(rest)
    return (shape, m.group(1), m.group(2)) if m else None


def _dims(shape: str) -> list[int] | None:
    m = _ARRAY.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else None


def _split_operands(rest: str) -> tuple[list[str], str]:
    """Operand names of ``op(...)`` and the attribute text after the closing parenthesis."""
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    inner, attrs = rest[:i - 1], rest[i:]
    names = re.findall(r"%([\w.\-]+)", inner)
    return names, attrs


def _lines(text: str):
    """The module's lines with an instruction's continuation lines joined to it: a Mosaic
    custom call breaks its ``frontend_attributes`` over lines that start in column 0, and its
    ``metadata`` and ``backend_config`` (kernel name, cost estimate) sit on the last of them."""
    out: list[str] = []
    for line in text.splitlines():
        if (out and line and not line[0].isspace() and line.strip() != "}"
                and not _COMP.match(line) and not line.startswith("HloModule")
                and _INSTR.match(out[-1])):
            out[-1] += line
        else:
            out.append(line)
    return out


def _parse(text: str) -> tuple[dict, str | None]:
    """{computation: [(name, shape, opcode, operands, attrs, text, is_root)]}, the entry."""
    comps: dict[str, list] = {}
    entry, cur = None, None
    for line in _lines(text):
        m = _COMP.match(line)
        if m:
            cur = comps.setdefault(m.group(2), [])
            if m.group(1):
                entry = m.group(2)
            continue
        if cur is None:
            continue
        if line.strip() == "}":
            cur = None
            continue
        mi = _INSTR.match(line)
        if not mi:
            continue
        parsed = _shape_and_op(mi.group(3))
        if not parsed:
            continue
        shape, op, rest = parsed
        operands, attrs = _split_operands(rest)
        cur.append((mi.group(2), shape, op, operands, attrs, rest, bool(mi.group(1))))
    return comps, entry


def _constant(instr, scope: dict) -> int | None:
    """The integer an instruction holds: a constant, through copies and bitcasts."""
    while instr is not None and instr[2] in ("copy", "bitcast", "convert") and instr[3]:
        instr = scope.get(instr[3][0])
    if instr is None or instr[2] != "constant":
        return None
    m = re.match(r"\s*(-?\d+)\)", instr[5])
    return int(m.group(1)) if m else None


def _loop_step(comps: dict, while_instr, index: int) -> int | None:
    """The constant the body adds to tuple element ``index`` (the loop counter), or None."""
    body = re.search(r"body=%?([\w.\-]+)", while_instr[4])
    instrs = comps.get(body.group(1), []) if body else []
    by_name = {i[0]: i for i in instrs}
    root = next((i for i in instrs if i[6]), None)
    if root is None or root[2] != "tuple" or index >= len(root[3]):
        return None
    def through_copies(instr):
        while instr is not None and instr[2] in ("copy", "bitcast", "convert") and instr[3]:
            instr = by_name.get(instr[3][0])
        return instr

    upd = through_copies(by_name.get(root[3][index]))
    if upd is None or upd[2] != "add" or len(upd[3]) != 2:
        return None
    for a, b in (upd[3], upd[3][::-1]):
        counter, step = through_copies(by_name.get(a)), _constant(by_name.get(b), by_name)
        if (step is not None and counter is not None and counter[2] == "get-tuple-element"
                and re.search(r"index=(\d+)", counter[4]).group(1) == str(index)):
            return step
    return None


def _inferred_trips(comps: dict, caller: dict, while_instr) -> int | None:
    """Trips of a counted loop whose condition is ``i < N`` (``i <= N``) on a tuple element
    that starts at a constant and steps by a constant, as ``fori_loop`` and ``scan`` lower
    (XLA:TPU does not annotate ``known_trip_count``) and as XLA's windowed einsums (an
    all-gathered matmul as a loop over shards, two a trip: i += 2) do; None if the loop is not
    of that form."""
    cond = re.search(r"condition=%?([\w.\-]+)", while_instr[4])
    body = comps.get(cond.group(1), []) if cond else []
    by_name = {i[0]: i for i in body}
    root = next((i for i in body if i[6]), None)
    if root is None or root[2] != "compare" or len(root[3]) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root[4])
    a, b = (by_name.get(o) for o in root[3])
    if direction and direction.group(1) in ("GT", "GE"):
        a, b = b, a
        op = {"GT": "LT", "GE": "LE"}[direction.group(1)]
    else:
        op = direction.group(1) if direction else None
    bound = _constant(b, by_name)
    if op not in ("LT", "LE") or bound is None or a is None or a[2] != "get-tuple-element":
        return None
    index = int(re.search(r"index=(\d+)", a[4]).group(1))
    init_tuple = caller.get(while_instr[3][0]) if while_instr[3] else None
    start = 0
    if init_tuple is not None and init_tuple[2] == "tuple" and index < len(init_tuple[3]):
        start = _constant(caller.get(init_tuple[3][index]), caller)
        if start is None:
            return None
    step = _loop_step(comps, while_instr, index)
    if step is None or step <= 0:
        return None
    return max(-(-(bound - start + (op == "LE")) // step), 0)


def _dot_flops(out, lhs, attrs) -> float:
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    contract = [int(d) for d in m.group(1).split(",") if d] if m else []
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)


def _conv_flops(out, lhs, rhs, attrs) -> float:
    """2 * MACs of a convolution, padding taps excluded (as XLA's cost analysis counts them):
    XLA:TPU writes batched dots as convolutions whose batch dims are padded spatial windows
    (``size=8 pad=7_7``: one valid tap in eight), so a tap count per window would overcount."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not m:
        return 2.0 * math.prod(out) * math.prod(rhs) / max(rhs[-1], 1)
    lhs_l, rhs_l, out_l = m.groups()
    spatial = sorted(c for c in rhs_l if c.isdigit())
    win = {}
    w = re.search(r"window=\{([^}]*)\}", attrs)
    for part in (w.group(1).split() if w else []):
        key, _, val = part.partition("=")
        win[key] = val.split("x")
    macs = math.prod(out) * rhs[rhs_l.index("i")]
    for n, d in enumerate(spatial):
        size = rhs[rhs_l.index(d)]
        I, O = lhs[lhs_l.index(d)], out[out_l.index(d)]
        lo = int(win["pad"][n].split("_")[0]) if "pad" in win else 0
        stride = int(win["stride"][n]) if "stride" in win else 1
        ld = int(win["lhs_dilate"][n]) if "lhs_dilate" in win else 1
        rd = int(win["rhs_dilate"][n]) if "rhs_dilate" in win else 1
        pos = (np.arange(O)[:, None] * stride + np.arange(size)[None, :] * rd - lo)
        valid = int(np.sum((pos >= 0) & (pos <= (I - 1) * ld) & (pos % ld == 0)))
        macs = macs / O * valid
    return 2.0 * macs


_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")
_FLOAT = re.compile(r"^(bf16|f16|f32|f64|f8\w*)\[")


def _splash_flops(phase: str, operands: list, outputs: list, attrs: str) -> float:
    """Matmul FLOPs of one splash attention kernel, from its q, k, v operands.

    Splash hands XLA no cost estimate. Its operands are the mask's block tables (integers),
    then q [..., H, Tq, d], k and v [..., (K,) Tk, d] (``*_layout`` 2: d before T); the
    leading dims (a vmap over rows) multiply. A causal mask is assumed, so a kernel costs
    the (query, key) pairs a causal row sees, T(T+1)/2 (MaxText's causal = full / 2; the
    diagonal blocks the kernel computes whole are not counted). Per pair and head: forward
    QK and PV, 2(d + dv); the dq kernel recomputes QK and dP and forms dQ, 2(2d + dv); the
    dkv kernel recomputes QK and dP and forms dK and dV, 2(2d + 2dv), plus 2d more when it
    also forms dQ (the fused backward, whose outputs hold [key blocks, *q.shape] partial dQs).
    """
    arrays = [dims for text, dims in operands if dims and _FLOAT.match(text)]
    if len(arrays) < 3:
        return 0.0
    q, k, v = arrays[:3]

    def seq_dim(x, name):
        seq_minor = re.search(name + r'_layout\\?"\s*:\s*2', attrs)
        return (x[-1], x[-2]) if seq_minor else (x[-2], x[-1])

    (Tq, d), (Tk, _), (_, dv) = seq_dim(q, "q"), seq_dim(k, "k"), seq_dim(v, "v")
    rows_heads = math.prod(q[:-2])
    pairs = rows_heads * (visible_pairs(Tq) if Tq == Tk else Tq * Tk)
    per_pair = {"fwd": d + dv, "dq": 2 * d + dv, "dkv": 2 * d + 2 * dv}[phase]
    if phase == "dkv" and any(o and len(o) == len(q) + 1 and o[-3:] == q[-3:]
                              for _, o in outputs):
        per_pair += d  # fused backward: dQ formed here too, one partial per key block
    return 2.0 * pairs * per_pair


def _custom_call_flops(attrs, operands=(), outputs=()) -> float:
    """A kernel's cost estimate, else a splash kernel's analytic count, else 0."""
    m = re.search(r'"flops"\s*:\s*"?(\d+)', attrs) or re.search(r"\\\"flops\\\"\s*:\s*(\d+)",
                                                                  attrs)
    if m:
        return float(m.group(1))
    kernel = _SPLASH.search(attrs) if "tpu_custom_call" in attrs else None
    return _splash_flops(kernel.group(1), list(operands), list(outputs), attrs) if kernel else 0.0


def _tuple_arrays(shape: str) -> list[tuple[str, list[int] | None]]:
    """(text, dims) of each array in a (possibly tuple) shape."""
    parts = re.findall(r"[a-z]+\d*\[[\d,]*\]", shape)
    return [(p, _dims(p)) for p in parts]


def hlo_flops(text: str) -> dict:
    """Matmul FLOPs of a compiled module with loops counted per trip (see module doc).

    Returns {'flops', 'dot', 'conv', 'custom_call', 'loops': [(body, trips)], 'unknown_trips':
    loops whose trip count XLA did not annotate (counted once)}.
    """
    comps, entry = _parse(text)
    kinds = {"dot": 0.0, "conv": 0.0, "custom_call": 0.0}
    loops, unknown = [], []
    memo: dict[str, dict] = {}

    def visit(name: str) -> dict:
        if name in memo:
            return memo[name]
        memo[name] = {k: 0.0 for k in kinds}  # recursion guard
        shapes, types, tot = {}, {}, {k: 0.0 for k in kinds}
        caller = {i[0]: i for i in comps.get(name, [])}
        for instr in comps.get(name, []):
            iname, shape, op, operands, attrs = instr[:5]
            shapes[iname], types[iname] = _dims(shape), shape
            out = shapes[iname]
            ins = [shapes.get(o) for o in operands]
            if op == "dot" and out is not None and ins and ins[0] is not None:
                tot["dot"] += _dot_flops(out, ins[0], attrs)
            elif op == "convolution" and out is not None and len(ins) > 1 and all(ins[:2]):
                tot["conv"] += _conv_flops(out, ins[0], ins[1], attrs)
            elif op == "custom-call":
                tot["custom_call"] += _custom_call_flops(
                    attrs, [(types.get(o, ""), shapes.get(o)) for o in operands],
                    _tuple_arrays(shape))
            callees = [(c, role) for role, c in _CALLEE.findall(attrs)]
            mb = _BRANCHES.search(attrs)
            if mb:
                branches = [visit(b.strip().lstrip("%")) for b in mb.group(1).split(",")]
                best = max(branches, key=lambda d: sum(d.values()), default=None)
                for k in kinds:
                    tot[k] += best[k] if best else 0.0
            trips = 1
            if op == "while":
                mt = _TRIPS.search(attrs)
                known = int(mt.group(1)) if mt else _inferred_trips(comps, caller, instr)
                trips = 1 if known is None else known
                body = next((c for c, r in callees if r == "body"), iname)
                (loops if known is not None else unknown).append((body, trips))
            for c, role in callees:
                if role == "condition":
                    continue
                if role in ("true_computation", "false_computation"):
                    continue  # counted below as the larger branch
                sub = visit(c)
                for k in kinds:
                    tot[k] += trips * sub[k]
            tf = [c for c, r in callees if r in ("true_computation", "false_computation")]
            if tf:
                best = max((visit(c) for c in tf), key=lambda d: sum(d.values()))
                for k in kinds:
                    tot[k] += best[k]
        memo[name] = tot
        return tot

    tot = visit(entry) if entry else {k: 0.0 for k in kinds}
    return {"flops": sum(tot.values()), **tot, "loops": loops, "unknown_trips": unknown}


def cost_analysis_flops(compiled) -> float:
    """XLA's own ``cost_analysis()['flops']`` (loop bodies once; elementwise ops included)."""
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0))


def summary(compiled, model_flops: float, devices: int = 1) -> dict:
    """Per-device HLO matmul FLOPs, XLA's raw count, and the HLO/model ratio for a step."""
    h = hlo_flops(compiled.as_text())
    return {"hlo_flops": h["flops"], "hlo_flops_by_kind": {k: h[k] for k in
                                                           ("dot", "conv", "custom_call")},
            "loop_trips": [t for _, t in h["loops"]], "unknown_trip_loops": len(h["unknown_trips"]),
            "cost_analysis_flops": cost_analysis_flops(compiled),
            "model_flops": model_flops,
            "hlo_over_model": h["flops"] * devices / model_flops if model_flops else float("nan")}


_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _frames(text: str) -> dict[int, str]:
    """stack_frame_id -> 'function file:line' of its innermost location (the module's
    FileNames / FunctionNames / FileLocations / StackFrames tables)."""
    tables: dict[str, dict[int, str]] = {}
    cur = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = tables.setdefault(line, {})
        elif cur is not None and line[:1].isdigit():
            key, _, val = line.partition(" ")
            cur[int(key)] = val
        elif cur is not None:
            cur = None
    files, funcs = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        path = files.get(int(f.group(1)), "?").strip('"') if f else "?"
        locs[k] = (f"{funcs.get(int(fn.group(1)), '?').strip(chr(34))} "
                   f"{'/'.join(path.split('/')[-2:])}:{ln.group(1) if ln else '?'}")
    stack = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        stack[k] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) - 1 if parent else 0)
    out = {}
    for k in stack:  # the innermost frame outside installed libraries (jax, flax, optax)
        frame, seen = k, set()
        while frame in stack and frame not in seen:
            seen.add(frame)
            loc = stack[frame][0]
            if "site-packages" not in files.get(_loc_file(tables, loc), ""):
                break
            frame = stack[frame][1]
        out[k] = locs.get(stack.get(frame, stack[k])[0], "?")
    return out


def _loc_file(tables, loc: int) -> int:
    m = re.search(r"file_name_id=(\d+)", tables.get("FileLocations", {}).get(loc, ""))
    return int(m.group(1)) if m else 0


def flops_by_op(text: str) -> dict[str, float]:
    """Matmul FLOPs of a compiled module by where the op was written: 'fwd|bwd function
    file:line' (bwd: under a ``transpose``), loops counted per trip, every branch of a
    conditional counted. Where the HLO's FLOPs go, largest first."""
    comps, entry = _parse(text)
    frames = _frames(text)
    out: dict[str, float] = {}

    def walk(name: str, mult: float):
        shapes, types = {}, {}
        caller = {i[0]: i for i in comps.get(name, [])}
        for instr in comps.get(name, []):
            iname, shape, op, operands, attrs = instr[:5]
            shapes[iname], types[iname] = _dims(shape), shape
            out_dims, ins = shapes[iname], [shapes.get(o) for o in operands]
            f = 0.0
            if op == "dot" and out_dims is not None and ins and ins[0] is not None:
                f = _dot_flops(out_dims, ins[0], attrs)
            elif op == "convolution" and out_dims is not None and len(ins) > 1 and all(ins[:2]):
                f = _conv_flops(out_dims, ins[0], ins[1], attrs)
            elif op == "custom-call":
                f = _custom_call_flops(attrs, [(types.get(o, ""), shapes.get(o))
                                               for o in operands], _tuple_arrays(shape))
            if f:
                m, fr = _OP_NAME.search(attrs), _FRAME.search(attrs)
                phase = "bwd" if m and "transpose(" in m.group(1) else "fwd"
                where = frames.get(int(fr.group(1)), "?") if fr else op
                key = f"{phase} {where}"
                out[key] = out.get(key, 0.0) + f * mult
            trips = 1
            if op == "while":
                mt = _TRIPS.search(attrs)
                trips = int(mt.group(1)) if mt else (_inferred_trips(comps, caller, instr) or 1)
            mb = _BRANCHES.search(attrs)
            callees = [c for role, c in _CALLEE.findall(attrs) if role != "condition"]
            callees += [b.strip().lstrip("%") for b in mb.group(1).split(",")] if mb else []
            for c in callees:
                walk(c, mult * trips)

    if entry:
        walk(entry, 1.0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
