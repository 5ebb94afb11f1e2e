"""Code test formats as a judged plan: what the child computes and what the parent checks.

``plan_for(record)`` turns a record's tests into a ``Plan``: steps sent to the candidate's
sandboxed child (``code_judge``), which only computes values, and one check per test that runs
here on the values it sends back. The expected values stay in the plan's checks, never in its
steps.

Test formats (``record['tests']``: one, or a list mixing them):

* ``"assert add(2, 3) == 5"``: a Python snippet. Each ``assert`` is split: the sub-expressions
  that need the candidate (``add(2, 3)``) run in the child, the rest (``== 5``, ``not``,
  ``abs(...) < 1e-6``, ``sorted(...)``, ``math.isclose``, literals) here. Other statements
  (imports, helpers, ``x = make_input()``) run in the child in order; ``name = <literal>`` runs
  here too. ``def check(candidate): ...`` plus ``check(f)`` (HumanEval) and ``def test_*():``
  bodies (pytest style) are flattened. An assert whose comparison would have to run in the
  child (inside a comprehension or lambda) or inside a loop is refused (``TestFormatError``).
* ``{"call": "add(2, 3)", "expected": 5}``, or ``{"fn": "add", "args": [2, 3], "expected": 5}``.
* ``{"stdin": "2 3\\n", "stdout": "5\\n"}`` (also ``input``/``output``, LiveCodeBench's
  ``"testtype": "stdin"``): the program runs as ``__main__`` on that input in its own forked
  process; outputs compare line by line, whitespace-normalised.
* ``{"input": "[2, 3]", "output": "5", "testtype": "functional"}`` with ``record['fn_name']``
  (LiveCodeBench): one JSON argument per input line.
* ``record['input_output'] = {"inputs": [...], "outputs": [...], "fn_name": ...}`` (APPS, TACO;
  a dict or its JSON text) when there is no ``tests``: with ``fn_name`` call cases (an output
  also matches when it equals ``outputs[i][0]``, as APPS's checker allows), else stdin cases.

Call results compare with ``==`` after tuples become lists (JSON expected values have no
tuples); assert snippets keep Python's types; a generator, iterator, ``range`` or dict view
comes back as its items (``Iterated``: iterable, equal to no list, as in Python). A name the
test asks for that the candidate lacks at module level is looked up as a method of
``Solution()`` (LeetCode style).

Limit: a helper the *test* defines (a reference solution, a checker returning a bool) runs in
the child beside the candidate, so what it holds is within the candidate's reach; keep the
comparison in the assert.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import operator


class TestFormatError(ValueError):
    """A test the judge cannot run so that its verdict stays outside the candidate."""


# --- the plan: what the child computes, what the parent checks ------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    groups: tuple  # JSON-able, sent to the child: {"kind": "module"|"stdin", "steps": [...]}
    checks: tuple  # one per group: check(values) -> bool, values[probe] = ("ok", v) | ("err", _)
    probes: int
    stdin_cases: int


class _Builder:
    def __init__(self):
        self.groups, self.checks, self.probes, self.stdin = [], [], 0, 0

    def probe(self) -> int:
        self.probes += 1
        return self.probes - 1

    def add(self, kind, steps, check):
        self.groups.append({"kind": kind, "steps": steps})
        self.checks.append(check)

    def plan(self) -> Plan:
        if not self.groups:
            raise TestFormatError("no test cases")
        return Plan(tuple(self.groups), tuple(self.checks), self.probes, self.stdin)


def plan_for(record: dict) -> Plan:
    """The judged plan of ``record``'s tests (cached by their JSON text)."""
    key = {k: record[k] for k in ("tests", "input_output", "fn_name") if k in record}
    try:
        text = json.dumps(key, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TestFormatError(f"tests are not JSON data ({e})") from None
    return _plan(text)


@functools.lru_cache(maxsize=4096)
def _plan(text: str) -> Plan:
    spec = json.loads(text)
    b = _Builder()
    tests = spec.get("tests")
    if tests is None:
        io = spec.get("input_output")
        if io is None:
            raise TestFormatError("the record has neither 'tests' nor 'input_output'")
        _add_apps(b, json.loads(io) if isinstance(io, str) else io)
        return b.plan()
    for i, t in enumerate([tests] if isinstance(tests, (str, dict)) else tests):
        try:
            if isinstance(t, str):
                _add_snippet(b, t)
            elif isinstance(t, dict):
                _add_case(b, t, spec.get("fn_name"))
            else:
                raise TestFormatError(f"a test is a string or an object, got {type(t).__name__}")
        except (TestFormatError, SyntaxError) as e:
            raise TestFormatError(f"test {i} ({str(t)[:120]!r}): {e}") from None
    return b.plan()


def _same(got, expected, unwrap=False) -> bool:
    try:
        got = _lists(got)
        return got == expected or (unwrap and isinstance(expected, list) and len(expected) == 1
                                   and got == expected[0])
    except (RecursionError, TypeError, ValueError):
        return False


def _lists(v):
    if isinstance(v, (list, tuple)):
        return [_lists(x) for x in v]
    if isinstance(v, dict):
        return {k: _lists(x) for k, x in v.items()}
    return v


def _value_check(pid, expected, unwrap=False):
    def check(values):
        status, v = values.get(pid, ("err", None))
        return status == "ok" and _same(v, expected, unwrap)
    return check


def _add_case(b: _Builder, t: dict, fn_name) -> None:
    if "call" in t or "fn" in t:
        if "expected" not in t:
            raise TestFormatError("a call case needs 'expected'")
        pid = b.probe()
        if "call" in t:
            if not isinstance(t["call"], str):
                raise TestFormatError("'call' is a Python expression (a string)")
            ast.parse(t["call"], mode="eval")  # a SyntaxError names the case
            step = ["eval", pid, t["call"]]
        else:
            if not isinstance(t["fn"], str) or not isinstance(t.get("args", []), list):
                raise TestFormatError("'fn' is a function name and 'args' a list")
            step = ["fn", pid, t["fn"], _literal(t.get("args", []))]
        b.add("module", [step], _value_check(pid, t["expected"]))
        return
    stdin = t.get("stdin", t.get("input"))
    stdout = t.get("stdout", t.get("output"))
    if t.get("testtype") == "functional":
        if not isinstance(fn_name, str):
            raise TestFormatError("a functional case needs record['fn_name']")
        try:
            args = [json.loads(line) for line in str(stdin).splitlines() if line.strip()]
            expected = json.loads(stdout)
        except ValueError as e:
            raise TestFormatError(f"functional input/output must be JSON lines ({e})") from None
        pid = b.probe()
        b.add("module", [["fn", pid, fn_name, _literal(args)]], _value_check(pid, expected))
        return
    if not isinstance(stdin, str) or not isinstance(stdout, str):
        raise TestFormatError("a case is {'call', 'expected'}, {'fn', 'args', 'expected'} or "
                              "{'stdin': str, 'stdout': str}")
    _add_stdin(b, stdin, stdout)


def _literal(args) -> str:
    """JSON arguments as Python source the child evaluates afresh for each call."""
    text = repr(args)
    try:
        if ast.literal_eval(text) != args:
            raise ValueError
    except (ValueError, SyntaxError):
        raise TestFormatError(f"arguments {text[:80]} are not plain data") from None
    return text


def _add_stdin(b: _Builder, stdin: str, stdout: str) -> None:
    pid = b.probe()
    b.stdin += 1
    want = normalize_output(stdout)

    def check(values):
        status, v = values.get(pid, ("err", None))
        return status == "ok" and isinstance(v, str) and normalize_output(v) == want
    b.add("stdin", [["stdin", pid, stdin]], check)


def normalize_output(text: str) -> list[list[str]]:
    """Program output as lines of whitespace-separated tokens, blank lines dropped."""
    return [line.split() for line in text.splitlines() if line.strip()]


def _add_apps(b: _Builder, io) -> None:
    if not (isinstance(io, dict) and isinstance(io.get("inputs"), list)
            and isinstance(io.get("outputs"), list) and len(io["inputs"]) == len(io["outputs"])):
        raise TestFormatError("input_output must be {'inputs': [...], 'outputs': [...]} of "
                              "equal length (APPS/TACO), optionally with 'fn_name'")
    fn = io.get("fn_name")
    for inp, out in zip(io["inputs"], io["outputs"]):
        if fn:
            pid = b.probe()
            args = inp if isinstance(inp, list) else [inp]
            b.add("module", [["fn", pid, fn, _literal(args)]],
                  _value_check(pid, out, unwrap=True))
        else:
            join = lambda x: "\n".join(x) if isinstance(x, list) else str(x)
            _add_stdin(b, join(inp), join(out))


# --- assert snippets -------------------------------------------------------------------------

_SAFE_FUNCS = {f.__name__: f for f in (abs, all, any, bool, dict, float, frozenset, int, len,
                                       list, max, min, round, set, sorted, str, sum, tuple,
                                       isinstance, type, repr)}
_SAFE_NAMES = {"None": None, "True": True, "False": False}
_SAFE_MATH = {n: getattr(math, n) for n in ("isclose", "fabs", "sqrt", "floor", "ceil", "isnan",
                                            "isinf", "isfinite", "inf", "nan", "pi", "e")}
_VERDICT = (ast.Compare, ast.BoolOp, ast.IfExp)
_STRUCT = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp,
           ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice)


class _Probe(ast.expr):
    """A sub-expression the child evaluates; ``id`` indexes the values it returns."""
    _fields = ()

    def __init__(self, pid):
        super().__init__()
        self.id = pid


def _add_snippet(b: _Builder, source: str) -> None:
    body = _flatten(ast.parse(source).body)
    steps, asserts, env = [], [], {}
    data_steps = []  # (index in steps, name, source) of parent-side data assignments
    for stmt in body:
        if isinstance(stmt, ast.Assert):
            parent = _split(stmt.test, b, steps, env)
            asserts.append(parent)
        elif _is_data_assign(stmt, env) and \
                (value := _try_evaluate(stmt.value, env)) is not _NO_VALUE:
            name = stmt.targets[0].id
            env[name] = value
            data_steps.append((len(steps), name, ast.unparse(stmt)))
            steps.append(None)  # placeholder: sent to the child only if a probe reads it
        else:
            if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
                raise TestFormatError("an assert inside a loop, branch or other block cannot be "
                                      "judged outside the candidate; write top-level asserts")
            for n in ast.walk(stmt):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    env.pop(n.id, None)  # rebound by the child: no longer parent data
            steps.append(["exec", ast.unparse(stmt)])
    if not asserts:
        raise TestFormatError("a test snippet needs at least one assert")
    read = {n.id for s in steps if s and s[0] == "eval" for n in ast.walk(ast.parse(s[2]))
            if isinstance(n, ast.Name)}
    read |= {n.id for s in steps if s and s[0] == "exec" for n in ast.walk(ast.parse(s[1]))
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for i, name, src in data_steps:
        steps[i] = ["exec", src] if name in read else None
    steps = [s for s in steps if s is not None]
    frozen_env = dict(env)

    def check(values, _asserts=tuple(asserts)):
        try:
            return all(_evaluate(a, frozen_env, values) for a in _asserts)
        except _Failed:
            return False
        except Exception:  # noqa: BLE001 - the test's own operators on returned data
            return False
    b.add("module", steps, check)


_NO_VALUE = object()


def _try_evaluate(node, env):
    try:
        return _evaluate(node, env, {})
    except Exception:  # noqa: BLE001 - then the child runs it
        return _NO_VALUE


def _flatten(body: list) -> list:
    """HumanEval ``def check(candidate)`` + ``check(f)``, and pytest ``def test_*():`` bodies,
    as top-level statements."""
    out, checks = [], {}
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "check" and \
                [a.arg for a in stmt.args.args] == ["candidate"]:
            checks["check"] = stmt.body
        elif isinstance(stmt, ast.FunctionDef) and stmt.name.startswith("test") and \
                not stmt.args.args:
            out += _flatten(stmt.body)
        elif (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
              and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id in checks
              and len(stmt.value.args) == 1 and not stmt.value.keywords):
            bind = ast.Assign([ast.Name("candidate", ast.Store())], stmt.value.args[0])
            out += [ast.fix_missing_locations(bind)] + _flatten(checks[stmt.value.func.id])
        elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == "METADATA"):
            continue  # HumanEval's metadata dict
        else:
            out.append(stmt)
    return out


def _is_data_assign(stmt, env) -> bool:
    return (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name) and _parent_only(stmt.value, env))


def _parent_only(node, env) -> bool:
    return not any(isinstance(n, _Probe) for n in ast.walk(_split(node, None, None, env)))


def _safe_name(node, env) -> bool:
    return isinstance(node, ast.Name) and (node.id in env or node.id in _SAFE_NAMES
                                           or node.id in _SAFE_FUNCS)


def _safe_call(node, env) -> bool:
    f = node.func
    if isinstance(f, ast.Name):
        ok = f.id in _SAFE_FUNCS and f.id not in env
    else:
        ok = (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
              and f.value.id == "math" and f.attr in _SAFE_MATH)
    # a lambda or comprehension argument (sorted(key=...), all(... for ...)) needs the
    # candidate's values one by one: then the whole call runs in the child
    inner = [n for a in node.args + [k.value for k in node.keywords] for n in ast.walk(a)]
    return ok and not any(isinstance(n, (ast.Starred, ast.Lambda, ast.GeneratorExp,
                                         ast.ListComp, ast.SetComp, ast.DictComp))
                          for n in inner) and all(k.arg is not None for k in node.keywords)


def _split(node, b, steps, env):
    """``node`` with every maximal sub-expression the parent cannot evaluate replaced by a
    probe (appended to ``steps`` as a child ``eval``); b=None only asks whether any would be."""
    if isinstance(node, _STRUCT) or _safe_name(node, env):
        if isinstance(node, ast.Name):
            return node
        new = type(node)(**{f: getattr(node, f) for f in node._fields})
        for field in node._fields:
            value = getattr(node, field)
            if isinstance(value, ast.expr):
                setattr(new, field, _split(value, b, steps, env))
            elif isinstance(value, list):
                setattr(new, field, [_split(v, b, steps, env) if isinstance(v, ast.expr)
                                     else v for v in value])
        return new
    if isinstance(node, ast.Call) and _safe_call(node, env):
        return ast.Call(node.func, [_split(a, b, steps, env) for a in node.args],
                        [ast.keyword(k.arg, _split(k.value, b, steps, env))
                         for k in node.keywords])
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == "math" and node.attr in _SAFE_MATH:
        return node
    if b is None:
        return _Probe(-1)
    if any(isinstance(n, _VERDICT) or (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not))
           for n in ast.walk(node)):
        raise TestFormatError(f"the comparison in {ast.unparse(node)!r} would run in the "
                              "candidate's process; compare at the top of the assert instead")
    pid = b.probe()
    steps.append(["eval", pid, ast.unparse(node)])
    return _Probe(pid)


class _Failed(Exception):
    pass


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow, ast.LShift: operator.lshift, ast.RShift: operator.rshift,
        ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos,
          ast.Invert: operator.invert}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_,
        ast.IsNot: operator.is_not, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b}
_BIG = 1 << 24  # elements / bits a parent-side operation may create


def _binop(op, a, b):
    if isinstance(op, (ast.Pow, ast.LShift)) and isinstance(a, int) and isinstance(b, int):
        if b > 0 and (abs(a) > 1 or isinstance(op, ast.LShift)) and \
                (b if isinstance(op, ast.LShift) else b * max(abs(a).bit_length(), 1)) > _BIG:
            raise _Failed("too large")
    if isinstance(op, ast.Mult):
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and \
                    len(seq) * n > _BIG:
                raise _Failed("too large")
    return _BIN[type(op)](a, b)


def _evaluate(node, env, values):
    """Evaluate a split assert expression over plain data: probes from ``values``."""
    ev = lambda n: _evaluate(n, env, values)  # noqa: E731
    if isinstance(node, _Probe):
        status, v = values.get(node.id, ("err", None))
        if status != "ok":
            raise _Failed("probe failed")
        return v
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in _SAFE_NAMES:
            return _SAFE_NAMES[node.id]
        return _SAFE_FUNCS[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [ev(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Failed("** in a dict display")
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BinOp):
        return _binop(node.op, ev(node.left), ev(node.right))
    if isinstance(node, ast.BoolOp):
        v = None
        for operand in node.values:
            v = ev(operand)
            if bool(v) != isinstance(node.op, ast.And):
                return v
        return v
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = ev(comp)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else ev(p) for p in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Attribute):
        return _SAFE_MATH[node.attr]
    if isinstance(node, ast.Call):
        f = _SAFE_MATH[node.func.attr] if isinstance(node.func, ast.Attribute) else \
            _SAFE_FUNCS[node.func.id]
        args = [ev(a) for a in node.args]
        if f in (set, frozenset, list, tuple, sorted, sum, min, max, all, any, dict) and \
                args and isinstance(args[0], range) and len(args[0]) > _BIG:
            raise _Failed("too large")
        return f(*args, **{k.arg: ev(k.value) for k in node.keywords})
    raise _Failed(f"cannot evaluate {type(node).__name__}")


class Iterated:
    """What a generator, iterator, ``range`` or dict view yielded in the child: iterable here
    (``set``, ``sorted``, ``list``, ``sum``, ``in`` work) but, as in Python, equal to no list."""

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = tuple(items)

    def __iter__(self):
        return iter(self.items)

    def __repr__(self):
        return f"Iterated({list(self.items)!r})"
