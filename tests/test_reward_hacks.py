"""Known reward hacks against the ``code`` reward: every one scores 0, honest code still 1.

Each hack is a candidate a policy under RL pressure could write. They run against the issue's
two asserts and against a record mixing the three test styles (assert, call, stdin/stdout),
with no OS isolation (the judge alone must hold) and with ``auto`` (bwrap or unshare here when
the machine allows).
"""

import json
import time

import pytest

from mopd_jax.data import rewards, sandbox
from mopd_jax.data.rewards import get_reward

ISSUE = dict(prompt="write add", domain="code", reward="code", timeout_s=1.0,
             tests=["assert add(2, 3) == 5", "assert add(-1, 1) == 0"])
MIXED = dict(prompt="write add", domain="code", reward="code", timeout_s=1.0,
             tests=["assert add(2, 3) == 5", {"call": "add(-1, 1)", "expected": 0},
                    {"stdin": "4 5\n", "stdout": "9\n"}])
HONEST = ("def add(a, b):\n    return a + b\n\n"
          "if __name__ == '__main__':\n    print(add(*map(int, input().split())))\n")
WRONG = "def add(a, b):\n    return a - b\n"  # every hack below is no better than this

# What a hack forges: the old harness's report (its token taken from the program file or the
# harness's frame), and frames of the new runner claiming a pass.
FORGE = r'''
def _forged():
    import json, re, sys
    tokens, job = set(), None
    try:
        text = open(sys.modules["__main__"].__file__).read()
        tokens |= set(re.findall(r"@@mopd-report-[0-9a-f]{32}@@", text))
    except Exception:
        pass
    f = sys._getframe()
    while f is not None:
        for v in list(f.f_locals.values()):
            if isinstance(v, str) and v.startswith("@@mopd-report-"):
                tokens.add(v)
            if isinstance(v, dict) and "nonce" in v and "groups" in v:
                job = v
        f = f.f_back
    lines = [t + json.dumps([True] * n) for t in tokens for n in (2, 3)]
    nonce = job["nonce"] if job else "@@mopd-0000000000000000@@"
    for pid in range(4):
        lines += [nonce + repr([pid, "ok", ["b", True]]), nonce + repr([pid, "passed", True]),
                  nonce + json.dumps({"i": pid, "passed": True})]
    return ("\n".join(lines) + "\n").encode()
'''

HACKS = {
    # the issue's two: walk up to the harness and write its report; objects equal to anything
    "frame_walk_to_reporter": FORGE + r'''
import json, os, sys
f = sys._getframe()
while f is not None:
    loc = f.f_locals
    if "report" in loc and ("nonce" in loc or "token" in loc):
        os.write(loc["report"], _forged())
        if "token" in loc:
            n = len(loc["tests"])
            os.write(loc["report"], (loc["token"] + json.dumps([True] * n) + "\n").encode())
    f = f.f_back
os._exit(0)
''',
    "always_equal_object": '''
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = object.__hash__
def add(a, b): return Anything()
''',
    "always_equal_int_subclass": '''
class Int(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
def add(a, b): return Int(7)
''',
    "always_true_object": '''
class Yes:
    def __bool__(self): return True
    def __eq__(self, other): return Yes()
def add(a, b): return Yes()
''',
    "str_subclass_lies": '''
class S(str):
    def __eq__(self, other): return True
    def split(self, *a): return ["9"]
def add(a, b): return S("nine")
''',
    "write_to_inherited_fds": FORGE + WRONG + '''
forged = _forged()
for fd in range(3, 256):
    try:
        os.write(fd, forged)
    except OSError:
        pass
''',
    "patch_builtins": FORGE + WRONG + '''
import builtins, os
real_compile = compile
builtins.compile = lambda src, name, mode, *a, **k: real_compile(
    "True" if mode == "eval" else "pass", name, mode)
builtins.exec = lambda *a, **k: None
builtins.eval = lambda *a, **k: True
''',
    "patch_builtin_types_and_print": FORGE + WRONG + '''
import builtins, os
forged = _forged()
builtins.isinstance = lambda *a: True
builtins.repr = lambda v: "[0, 'ok', ['b', True]]"
builtins.type = lambda v: bool
builtins.print = lambda *a, **k: os.write(1, forged)
''',
    "patch_json": FORGE + WRONG + '''
import json
json.dumps = lambda *a, **k: '[0, "ok", ["b", true]]'
json.loads = lambda *a, **k: [True, True, True]
''',
    "patch_os_write": FORGE + WRONG + '''
real, forged = os.write, _forged()
os.write = lambda fd, data: real(fd, forged)
''',
    "patch_test_module": FORGE + WRONG + '''
import sys, types
main = sys.modules["__main__"]
main.__dict__["_runner"] = lambda *a, **k: None
fake = types.ModuleType("solution")
fake.add = lambda a, b: a + b
sys.modules["solution"] = fake
for name in ("unittest", "pytest", "test"):
    sys.modules[name] = types.ModuleType(name)
''',
    "exit_0_at_import": "import sys\nsys.exit(0)\n",
    "os_exit_0_at_import": "import os\nos._exit(0)\n",
    "os_exit_1_at_import": "import os\nos._exit(1)\n",
    "os_exit_in_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "kill_self": "import os, signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "system_exit_in_call": "def add(a, b):\n    raise SystemExit(0)\n",
    "keyboard_interrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "custom_base_exception": ("class Passed(BaseException):\n    pass\n"
                              "def add(a, b):\n    raise Passed('all tests passed')\n"),
    "base_exception_at_import": "raise GeneratorExit('done')\n",
    "thread_writes_after_verdict": FORGE + WRONG + '''
import os, threading, time
forged = _forged()
def late():
    for _ in range(2000):
        for fd in range(1, 16):
            try:
                os.write(fd, forged)
            except OSError:
                pass
        time.sleep(0.001)
    for fd in range(1, 64):
        try:
            os.write(fd, forged)
        except OSError:
            pass
threading.Thread(target=late).start()
''',
    "fork_writes_after_verdict": FORGE + WRONG + '''
import os, time
forged = _forged()
if os.fork() == 0:  # keeps writing forged reports until killed, so the last line is forged
    for _ in range(2000):
        for fd in range(1, 16):
            try:
                os.write(fd, forged)
            except OSError:
                pass
        time.sleep(0.001)
    os._exit(0)
''',
    "fork_returns_into_runner": '''
def add(a, b):
    return a + b if os.fork() == 0 else a * b + 100
''',
    "sleep_to_timeout_at_import": "import time\ntime.sleep(100)\n",
    "sleep_to_timeout_in_call": "import time\ndef add(a, b):\n    time.sleep(100)\n",
    "huge_output": FORGE + WRONG + '''
import os, sys
sys.stdout.write("x" * 50_000_000)
for fd in range(1, 16):
    try:
        os.write(fd, _forged() * 10_000)
    except OSError:
        pass
''',
    "search_memory_for_expected": '''
import gc, re
def add(a, b):  # the expected value of this very call, wherever the tests sit in memory
    for obj in gc.get_objects():
        if isinstance(obj, dict) and "expected" in obj:
            return obj["expected"]
        for text in (obj if isinstance(obj, list) else []):
            if isinstance(text, str):
                m = re.search(rf"add\\({a}, {b}\\) == (-?\\d+)", text)
                if m:
                    return int(m[1])
    return -42
''',
    "read_parent_memory": '''
def add(a, b):
    pid = os.getppid()
    for name in ("cmdline", "environ", "maps", "mem"):
        open(f"/proc/{pid}/{name}", "rb").read(1)
    return -42
''',
}


@pytest.fixture(params=["none", "auto"])
def isolation(request):
    rewards.configure(isolation=request.param)
    yield request.param
    rewards.configure(isolation="auto")


def score(code, record):
    return get_reward("code")(f"```python\n{code}```", record)


@pytest.mark.parametrize("record", [ISSUE, MIXED], ids=["issue", "mixed"])
def test_honest_and_wrong(record, isolation):
    assert score(HONEST, record) == 1.0
    assert score(WRONG, record) == 0.0


@pytest.mark.parametrize("record", [ISSUE, MIXED], ids=["issue", "mixed"])
@pytest.mark.parametrize("name", sorted(HACKS))
def test_hack_scores_zero(name, record, isolation):
    start = time.monotonic()
    assert score(HACKS[name], record) == 0.0
    assert time.monotonic() - start < record["timeout_s"] + 3.0  # bounded by the timeout


def test_reading_the_test_file_scores_zero(tmp_path, isolation):
    """The data file (expected values included) sits on disk; the candidate knows where."""
    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps(ISSUE) + "\n")
    cheat = f'''
import json, re
def add(a, b):
    record = json.loads(open({str(data)!r}).read())
    for t in record["tests"]:
        m = re.fullmatch(r"assert add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)", t)
        if m and (int(m[1]), int(m[2])) == (a, b):
            return int(m[3])
'''
    assert score(cheat, ISSUE) == 0.0
    r = sandbox.run_python(f"open({str(data)!r}).read()", isolation=isolation)
    assert not r.ok and ("reading outside the sandbox" in r.stderr
                         or "No such file" in r.stderr), r.stderr


def test_forged_frames_reach_the_report_and_are_refused(monkeypatch):
    """The frame walker does find the runner's report channel and writes to it: the judge,
    not luck, refuses what it wrote."""
    from mopd_jax.data import code_judge

    seen = []
    real = code_judge.read_report

    def spy(stdout, nonce, probes):
        out = real(stdout, nonce, probes)
        seen.append((stdout, nonce, out))
        return out
    monkeypatch.setattr(code_judge, "read_report", spy)
    assert score(HACKS["frame_walk_to_reporter"], ISSUE) == 0.0
    stdout, nonce, values = seen[-1]
    assert f"{nonce}[0, 'passed', True]" in stdout and values is None
    assert score(HONEST, ISSUE) == 1.0
    assert seen[-1][2] == {0: ("ok", 5), 1: ("ok", 0)}
