"""Code tests judged where the candidate cannot reach: the child computes, the parent compares.

A candidate runs in a sandboxed child (``sandbox.run_python``) with the test *inputs* only. It
sends back plain values (numbers, strings, lists, tuples, dicts, sets; nothing with behaviour),
and this process compares them with the expected results, which never leave it. A candidate
can read or rewrite anything in its own process (the runner, its report channel, ``json``,
builtins), so nothing it reports is trusted beyond "this is the value I computed": forging a
report is worth exactly as much as computing the answer. A report that names a value twice or
one never asked for (a forged frame, a fork that returned into the runner) scores 0.

``judge(code, plan)`` runs ``plan``'s steps (``code_tests``) for candidate ``code`` in one
sandboxed child: module steps in the child's own interpreter (the candidate loaded once as
module ``solution``, each test in a fresh copy of its namespace), each stdin case in a process
forked for it. Every value goes back as one report line ``NONCE [probe, status, value]``, the
value tagged by type (``decode``); the parent reads only those lines, strictly.
"""

from __future__ import annotations

import ast
import secrets

from mopd_jax.data import code_tests, sandbox


# --- values crossing back: plain data only --------------------------------------------------

def decode(tagged, depth: int = 0):
    """A value the child sent, as plain Python data; anything malformed raises ValueError."""
    if depth > 200 or not (isinstance(tagged, list) and len(tagged) == 2):
        raise ValueError("malformed value")
    tag, v = tagged
    if tag == "n" and v is None:
        return None
    if (tag == "b" and type(v) is bool) or (tag == "i" and type(v) is int) or \
            (tag == "s" and type(v) is str):
        return v
    if tag == "f" and type(v) in (float, int, str):
        return float(v)  # a string for "nan", "inf", "-inf"
    if tag == "c" and isinstance(v, list) and len(v) == 2:
        return complex(float(v[0]), float(v[1]))
    if tag == "y" and type(v) is str:
        return bytes.fromhex(v)
    if not isinstance(v, list):
        raise ValueError("malformed value")
    if tag == "d":
        out = {}
        for pair in v:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError("malformed dict")
            out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
        return out
    items = [decode(x, depth + 1) for x in v]
    kinds = {"l": list, "t": tuple, "S": set, "F": frozenset, "g": code_tests.Iterated}
    if tag not in kinds:
        raise ValueError(f"unknown tag {tag!r}")
    return kinds[tag](items)


# --- the child ------------------------------------------------------------------------------

# Runs in the sandbox as __main__. Everything here is within the candidate's reach, and that is
# fine: it only computes; the parent holds the expected values and decides.
_RUNNER = r'''
def _runner(job, *, _os=__import__("os"), _sys=__import__("sys"),
            _builtins=__import__("builtins")):
    report = _os.dup(1)
    null = _os.open(_os.devnull, _os.O_RDWR)
    _os.dup2(null, 1)
    _os.dup2(null, 2)
    nonce, me, write = job["nonce"], _os.getpid(), _os.write
    type_, len_, int_, float_, str_, repr_ = type, len, int, float, str, repr
    list_iter, tuple_iter, dict_items = list.__iter__, tuple.__iter__, dict.items
    views = (range, type({}.keys()), type({}.values()), type({}.items()))

    def send(pid, status, payload):
        if _os.getpid() != me:  # a fork of the candidate returned into the runner
            _os._exit(0)
        try:  # repr of exact built-in types only (enc made them): one line for literal_eval
            line = nonce + repr_([pid, status, payload]) + "\n"
        except BaseException:
            line = nonce + repr_([pid, "err", "unsendable"]) + "\n"
        write(report, line.encode("utf-8", "replace"))

    budget = [0]

    def enc(v, depth=0):
        budget[0] += 1
        if depth > 100 or budget[0] > 1_000_000:
            raise ValueError("value too large")
        t = type_(v)
        if v is None:
            return ["n", None]
        if t is bool:
            return ["b", v]
        if isinstance(v, int):
            return ["i", int.__index__(v)]
        if isinstance(v, float):
            f = float.__float__(v)
            return ["f", f if f == f and f not in (float_("inf"), -float_("inf")) else repr_(f)]
        if isinstance(v, str):
            return ["s", str.__str__(v)]
        if isinstance(v, complex):
            return ["c", [complex.real.__get__(v), complex.imag.__get__(v)]]
        if isinstance(v, (bytes, bytearray)):
            return ["y", bytes(v).hex()]
        if isinstance(v, list):
            return ["l", [enc(x, depth + 1) for x in list_iter(v)]]
        if isinstance(v, tuple):
            return ["t", [enc(x, depth + 1) for x in tuple_iter(v)]]
        if isinstance(v, dict):
            return ["d", [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in dict_items(v)]]
        if isinstance(v, (set, frozenset)):
            return ["S" if isinstance(v, set) else "F", [enc(x, depth + 1) for x in v]]
        if t.__module__ == "numpy" and hasattr(v, "tolist"):
            return enc(v.tolist(), depth + 1)
        if hasattr(t, "__next__") or t in views:  # generator, map, zip, range, dict view...
            items = []
            for x in v:
                items.append(enc(x, depth + 1))
            return ["g", items]
        raise TypeError(f"cannot send a {t.__name__}")

    def load():
        mod = type_(_sys)("solution")
        _sys.modules["solution"] = mod
        exec(compile(job["code"], "solution.py", "exec"), mod.__dict__)
        return mod

    def lookup(ns, name):
        if name in ns:
            return ns[name]
        return getattr(ns["Solution"](), name)

    def run_stdin(pid, data):
        r, w = _os.pipe()
        out_path = f"stdout-{pid}.txt"
        out = _os.open(out_path, _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC, 0o600)
        try:
            child = _os.fork()
        except OSError as e:
            send(pid, "err", type_(e).__name__)
            return
        if child == 0:
            status = 1
            try:
                _os.close(report)
                _os.close(w)
                _os.dup2(r, 0)
                _os.dup2(out, 1)
                _sys.stdin = open(0, "r", closefd=False)
                _sys.stdout = stdout = open(1, "w", closefd=False)
                g = {"__name__": "__main__", "__builtins__": _builtins}
                try:
                    exec(compile(job["code"], "solution.py", "exec"), g)
                    status = 0
                except SystemExit as e:
                    status = 0 if e.code in (None, 0) else 1
                stdout.flush()
            except BaseException:
                pass
            _os._exit(status)
        _os.close(r)
        try:
            view = memoryview(data.encode())
            while view:
                view = view[write(w, view):]
        except OSError:
            pass  # it exited or stopped reading
        _os.close(w)
        status = _os.waitpid(child, 0)[1]
        _os.lseek(out, 0, 0)
        text = _os.read(out, job["max_output"]).decode("utf-8", "replace")
        _os.close(out)
        _os.unlink(out_path)
        if _os.waitstatus_to_exitcode(status) == 0:
            send(pid, "ok", ["s", text])
        else:
            send(pid, "err", "exit status")

    solution = None
    for group in job["groups"]:
        if group["kind"] == "stdin":
            for _, pid, data in group["steps"]:
                run_stdin(pid, data)
            continue
        if solution is None:
            try:
                solution = load()
            except BaseException:
                solution = False
        if solution is False:
            continue
        ns = dict(solution.__dict__)
        for step in group["steps"]:
            try:
                if step[0] == "exec":
                    exec(compile(step[1], "test.py", "exec"), ns)
                    continue
                if step[0] == "eval":
                    value = eval(compile(step[2], "test.py", "eval"), ns)
                else:
                    args = eval(step[3], {"__builtins__": {}})  # a fresh copy each time
                    value = lookup(ns, step[2])(*args)
            except BaseException as e:
                if step[0] == "exec":
                    break
                send(step[1], "err", type_(e).__name__[:80])
                continue
            try:
                budget[0] = 0
                payload = enc(value)
            except BaseException:
                send(step[1], "err", "unsendable")
                continue
            send(step[1], "ok", payload)
    _os._exit(0)
'''


def judge(code: str, plan: code_tests.Plan, *, timeout_s: float = 5.0, memory_mb: int = 512,
          isolation: str = "none", max_output_bytes: int = 1 << 20) -> list[bool]:
    """Whether each of ``plan``'s tests passes for candidate ``code`` (all False when the
    child's report is tampered with: a value sent twice or one never asked for)."""
    nonce = "@@mopd-" + secrets.token_hex(8) + "@@"
    job = {"nonce": nonce, "code": code, "groups": list(plan.groups),
           "max_output": max_output_bytes}
    program = f"{_RUNNER}\n_runner({job!r})\n"  # plain data: its repr is a literal
    result = sandbox.run_python(program, timeout_s=timeout_s, memory_mb=memory_mb,
                                max_procs=16 + plan.stdin_cases, isolation=isolation,
                                max_output_bytes=max_output_bytes)
    values = read_report(result.stdout, nonce, plan.probes)
    if values is None:
        return [False] * len(plan.checks)
    return [bool(check(values)) for check in plan.checks]


def read_report(stdout: str, nonce: str, probes: int) -> dict | None:
    """``{probe: (status, value)}`` from the child's report lines; None when tampered with."""
    values = {}
    for line in stdout.split("\n")[:-1]:  # a cut-off last line is no frame
        if not line.startswith(nonce):
            continue
        try:
            pid, status, payload = ast.literal_eval(line[len(nonce):])
            if type(pid) is not int or not 0 <= pid < probes or pid in values:
                return None
            if status == "ok":
                values[pid] = ("ok", decode(payload))
            elif status == "err":
                values[pid] = ("err", None)
            else:
                return None
        except (ValueError, TypeError, SyntaxError, RecursionError, OverflowError,
                MemoryError):
            return None
    return values
