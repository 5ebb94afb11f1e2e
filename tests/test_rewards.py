"""Rewards (exact_match, math, code), score_batch, and the sandbox against hostile candidates."""

import os
from pathlib import Path
import socket
import threading
import time

import numpy as np
import pytest

from mopd_jax.data import rewards, sandbox
from mopd_jax.data.rewards import RewardError, get_reward, score_batch

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]
FAST = dict(timeout_s=1.5, memory_mb=256)  # sandbox limits for the hostile cases


def code_record(tests=TESTS, **kw):
    return dict(prompt="write add", domain="code", reward="code", tests=tests, **kw)


def fenced(code, tag="python"):
    return f"Here is my solution:\n```{tag}\n{code}```\nDone."


def code_score(response, **kw):
    return get_reward("code")(response, code_record(**kw))


# --- exact_match / math --------------------------------------------------------------------

def test_exact_match():
    em = get_reward("exact_match")
    assert em("  Paris\n", {"answer": "Paris"}) == 1.0
    assert em("42", {"answer": 42}) == 1.0
    assert em("paris", {"answer": "Paris"}) == 0.0
    with pytest.raises(RewardError, match="needs record\\['answer'\\]"):
        em("x", {"prompt": "p"})


@pytest.mark.parametrize("response, answer", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("$\\boxed{-\\tfrac{3}{4}}$", "-0.75"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces, non-numeric
    ("\\boxed{\\left(1, 2\\right)}, i.e. \\boxed{(1,2)}", "(1,2)"),  # boxed twice, one answer
    ("\\boxed{1,000}", "1000"),
    ("The total is $1{,}000$ dollars", "1000"),
    ("It costs 1,234,567.50 in all", "1234567.5"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{5.0}", "5"),
    ("\\boxed{+3}", "3"),
    ("\\boxed{10^\\circ}", "10"),
    ("\\boxed{5 \\text{ cm}}", "5cm"),
    ("We get 12 apples, then 7 more: 19", "19"),
    ("Thus 3/4 of them", "0.75"),
    ("...\n#### 72", "72"),
    ("\\boxed{72}", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),  # GSM8K-style answer
])
def test_math_equivalent(response, answer):
    assert get_reward("math")(response, {"answer": answer}) == 1.0


@pytest.mark.parametrize("response, answer", [
    ("\\boxed{41}", "42"),
    ("\\boxed{\\frac{1}{3}}", "0.33"),
    ("\\boxed{1,001}", "1000"),
    ("\\boxed{(1,3)}", "(1,2)"),
    ("\\boxed{42", "42"),  # cut off inside the box: no committed answer
    ("no number here", "42"),
    ("\\boxed{}", ""),
    ("\\boxed{1e400000000}", "1"),  # no exponent parsing: cannot blow up
])
def test_math_wrong(response, answer):
    assert get_reward("math")(response, {"answer": answer}) == 0.0


@pytest.mark.parametrize("response", [
    "\\boxed{4} or \\boxed{5}",
    "first \\boxed{7}, finally \\boxed{\\left(1, 2\\right)}",
    "\\boxed{5} ... no wait \\boxed{4}",
])
def test_math_several_answers_score_zero(response):
    answer = "4" if "\\boxed{4}" in response else "(1,2)"
    math = get_reward("math")
    assert math(response, {"answer": answer}) == 0.0  # strict by default
    last = math(response, {"answer": answer, "distinct_answers": "last"})
    assert last == float(rewards.math_equal(rewards.last_boxed(response), answer))
    assert math("\\boxed{4} = \\boxed{4.0}", {"answer": "4"}) == 1.0  # the same answer twice
    with pytest.raises(RewardError, match="distinct_answers"):
        math(response, {"answer": answer, "distinct_answers": "first"})


def test_math_distinct_answers_setting():
    math = get_reward("math")
    try:
        assert "math distinct answers -> last" in rewards.configure(distinct_answers="last")
        assert math("\\boxed{5} or \\boxed{4}", {"answer": "4"}) == 1.0
    finally:
        rewards.configure(distinct_answers="zero")
    assert math("\\boxed{5} or \\boxed{4}", {"answer": "4"}) == 0.0
    with pytest.raises(RewardError, match="rewards.math.distinct_answers"):
        rewards.configure(distinct_answers="sometimes")


def test_math_helpers():
    assert rewards.last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{{x}^{2}}") == "{x}^{2}"
    assert rewards.last_boxed("\\boxed{unbalanced") is None
    assert rewards.to_rational("\\frac{6}{4}") == rewards.to_rational("1.5")
    assert rewards.to_rational("1/0") is None


# --- code ----------------------------------------------------------------------------------

def test_code_pass_partial_syntax_error():
    assert code_score(fenced(SOLUTION)) == 1.0
    assert code_score(fenced("def add(a, b):\n    return a + b if a != 'a' else None\n")) == \
        pytest.approx(2 / 3)
    assert code_score(fenced("def add(a, b) return a + b\n")) == 0.0
    assert code_score(SOLUTION) == 1.0  # no fence: the whole response
    assert code_score(fenced(SOLUTION, tag="")) == 1.0  # untagged block
    unclosed = f"```python\n{SOLUTION}"  # generation cut off after the code
    assert code_score(unclosed) == 1.0
    last_wins = fenced("def add(a, b):\n    return 0\n") + fenced(SOLUTION)
    assert code_score(last_wins) == 1.0
    assert code_score(fenced(SOLUTION), tests="assert add(2, 2) == 4") == 1.0


def test_code_cheats_get_nothing():
    # exiting early, or printing a fake report, does not count as passing
    assert code_score(fenced("import sys\nsys.exit(0)\n")) == 0.0
    assert code_score(fenced("import os\nprint('[true, true, true]')\nos._exit(0)\n")) == 0.0
    # reading stdin (closed) fails instead of hanging; a __main__ block does not run
    assert code_score(fenced("x = input()\n" + SOLUTION)) == 0.0
    assert code_score(fenced(SOLUTION + "if __name__ == '__main__':\n    input()\n")) == 1.0


def test_code_bad_tests_field():
    with pytest.raises(RewardError, match="tests"):
        code_score(SOLUTION, tests=[])
    with pytest.raises(RewardError, match="needs record\\['tests'\\]"):
        get_reward("code")(SOLUTION, {"prompt": "p"})


# --- hostile candidates: reward 0, caller unharmed, next solution still scores -------------

def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def test_infinite_loop_times_out():
    start = time.monotonic()
    assert code_score(fenced("while True:\n    pass\n"), **FAST) == 0.0
    assert time.monotonic() - start < FAST["timeout_s"] + 1.0
    r = sandbox.run_python("while True: pass", timeout_s=0.5)
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode == -9
    assert code_score(fenced(SOLUTION)) == 1.0


def test_memory_blowup():
    hog = "x = []\nwhile True:\n    x.append(b'x' * 10_000_000)\n"
    assert code_score(fenced(hog), **FAST) == 0.0
    r = sandbox.run_python(hog, memory_mb=256, timeout_s=5)
    assert not r.ok and not r.timed_out and r.killed_reason == "memory limit"
    assert code_score(fenced(SOLUTION)) == 1.0


def test_network_blocked():
    server = socket.create_server(("127.0.0.1", 0))  # reachable, so only the guard can fail it
    port = server.getsockname()[1]
    try:
        local = ("import socket\ndef add(a, b):\n"
                 f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
                 "    return a + b\n")
        assert code_score(fenced(local), **FAST) == 0.0
        remote = f"import socket\nsocket.socket().connect(('8.8.8.8', 53))\n{SOLUTION}"
        assert code_score(fenced(remote), **FAST) == 0.0
        r = sandbox.run_python(f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))")
        assert r.returncode == 1 and "network access is disabled" in r.stderr
        # control: the same connection works when allowed
        r = sandbox.run_python(f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))",
                               allow_network=True)
        assert r.ok, r.stderr
    finally:
        server.close()
    assert code_score(fenced(SOLUTION)) == 1.0


# At most 2**8 = 256 processes even if every guard failed; each prints its pid, then sleeps.
BOMB = """
import os, time
for _ in range(8):
    try:
        os.fork()
    except OSError:
        break
print(os.getpid(), flush=True)
time.sleep(60)
"""


def test_fork_bomb_is_bounded_and_killed():
    r = sandbox.run_python(BOMB, timeout_s=1.0, max_procs=8)
    assert r.timed_out
    pids = {int(p) for p in r.stdout.split()}
    assert 1 <= len(pids) <= 9  # the candidate + max_procs forks
    assert not [p for p in pids if _alive(p)]  # the whole group is dead on return
    start = time.monotonic()
    assert code_score(fenced(BOMB + SOLUTION), **FAST) == 0.0
    assert time.monotonic() - start < FAST["timeout_s"] + 2.0
    assert code_score(fenced(SOLUTION)) == 1.0


def test_sandbox_guard():
    cases = {
        "import subprocess; subprocess.run(['true'])": "subprocess.Popen is not allowed",
        "import os; os.system('true')": "os.system is not allowed",
        "open('/tmp/mopd-sandbox-escape', 'w')": "writing outside the sandbox",
        "import os; os.remove('/etc/hostname')": "os.remove outside the sandbox",
        "import os; os.kill(os.getppid(), 9)": "signals outside",
        "import os; os.setsid()": "no attribute 'setsid'",
        "import ctypes; ctypes.CDLL(None).fork": "ctypes.dlsym is not allowed",
        "import os; os.fork()": "process limit reached",
        ("import gc; hook = next(f for f in gc.get_objects()\n"
         "    if getattr(f, '__name__', '') == 'hook')\n"
         "hook.__defaults__ = None"): "the guard cannot be modified",
    }
    for code, message in cases.items():
        r = sandbox.run_python(code, max_procs=0)
        assert r.returncode == 1 and message in r.stderr, (code, r)
    assert not os.path.exists("/tmp/mopd-sandbox-escape")
    # what stays allowed: files in its own directory, fork-based multiprocessing
    r = sandbox.run_python("open('out.txt', 'w').write('hi'); print(open('out.txt').read())")
    assert r.ok and r.stdout == "hi\n"
    pool = ("from multiprocessing import Pool\nwith Pool(2) as p:\n"
            "    print(p.map(abs, [-1, -2]))\n")
    r = sandbox.run_python(pool)
    assert r.ok and r.stdout == "[1, 2]\n", r


def test_sandbox_limits_and_cleanup():
    r = sandbox.run_python("print('x' * 100_000)", max_output_bytes=1000)
    assert r.killed_reason == "output limit" and len(r.stdout) <= 1000
    r = sandbox.run_python("import os; print(os.getcwd())")
    assert r.ok and not os.path.exists(r.stdout.strip())  # temp dir deleted
    r = sandbox.run_python("import os; print(sorted(os.environ))")
    assert "PYTHONPATH" not in r.stdout and "HOME" in r.stdout
    r = sandbox.run_python("raise SystemExit(3)")
    assert r.returncode == 3 and r.killed_reason is None and not r.ok
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox.run_python("pass", timeout_s=0)


def test_sandbox_without_pidfd(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open")  # older kernels: the waitid polling path
    r = sandbox.run_python("while True: pass", timeout_s=0.3)
    assert r.timed_out and r.returncode == -9
    assert sandbox.run_python("print(1)").stdout == "1\n"


def test_user_task_count():
    # the base of RLIMIT_NPROC for non-root callers (root is exempt, so it is not set here)
    assert sandbox._user_task_count(os.getuid()) >= threading.active_count()


# --- registry / score_batch ----------------------------------------------------------------

def test_score_batch_mixed():
    records = [
        dict(prompt="p", domain="math", reward="math", answer="1/2"),
        code_record(),
        dict(prompt="p", domain="qa", answer="Paris"),  # uses the default
        code_record(),
        dict(prompt="p", domain="math", reward="math", answer="3"),
        code_record(tests=TESTS[:2]),
    ]
    responses = ["\\boxed{0.5}", fenced(SOLUTION), "Paris", "def add(a, b) oops",
                 "\\boxed{4}", fenced("def add(a, b):\n    return a + b + (a < 0)\n")]
    scores = score_batch(responses, records, default="exact_match", max_workers=2)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, np.array([1, 1, 1, 0, 0, 0.5], np.float32))
    np.testing.assert_array_equal(score_batch(responses, records, "exact_match", max_workers=1),
                                  scores)


def test_score_batch_from_threads():
    # two trainer threads scoring at once (Popen without preexec_fn is thread-safe)
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        score_batch([fenced(SOLUTION)] * 2, [code_record()] * 2))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [list(s) for s in out] == [[1.0, 1.0]] * 2


def test_registry_errors():
    with pytest.raises(RewardError, match="unknown reward 'nope'; known rewards: code, "
                                          "exact_match, ifeval, ifeval_loose, math"):
        get_reward("nope")
    with pytest.raises(RewardError, match="record 0 has no 'reward' field"):
        score_batch(["x"], [dict(prompt="p", domain="d")])
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        score_batch(["x"], [dict(prompt="p", domain="d", reward="nope")])
    with pytest.raises(ValueError, match="1 responses but 2 records"):
        score_batch(["x"], [{}, {}], default="exact_match")
    with pytest.raises(RewardError, match="already registered"):
        rewards.register("math")(lambda response, record: 0.0)


def test_register_custom_reward():
    name = "test_length"
    try:
        @rewards.register(name)
        def length(response, record):
            return min(len(response) / record["target_len"], 1.0)

        scores = score_batch(["ab", "abcdef"], [dict(reward=name, target_len=4)] * 2)
        np.testing.assert_array_equal(scores, [0.5, 1.0])

        @rewards.register("test_bad")
        def bad(response, record):
            return 2.0

        with pytest.raises(RewardError, match="returned 2.0; rewards must lie in \\[0, 1\\]"):
            score_batch(["x"], [dict(reward="test_bad")])
    finally:
        rewards.REWARDS.pop(name, None)
        rewards.REWARDS.pop("test_bad", None)


# --- test formats of real code-RL datasets ---------------------------------------------------

CODE_TASKS = Path(__file__).parent / "data" / "code_tasks.jsonl"


def test_code_dataset_formats():
    """APPS/TACO input_output (stdin and fn_name), LiveCodeBench stdin and functional, MBPP
    asserts, HumanEval check(candidate), pytest functions, call cases: from one local file."""
    from mopd_jax.data.sources import read_records

    records = read_records(CODE_TASKS)
    assert len(records) == 8
    good = score_batch([fenced(r["_good"]) for r in records], records)
    np.testing.assert_array_equal(good, np.ones(len(records), np.float32))
    bad = score_batch([fenced(r["_bad"]) for r in records], records)
    np.testing.assert_allclose(bad, [r["_bad_score"] for r in records], atol=1e-6)
    alt = [r for r in records if "_good_alt" in r]  # sys.stdin.buffer, trailing blanks, exit(0)
    assert list(score_batch([fenced(r["_good_alt"]) for r in alt], alt)) == [1.0]


@pytest.mark.parametrize("tests, ok, wrong", [
    (["assert f(3) == 9"], "def f(x): return x * x", "def f(x): return x + x"),
    (["assert abs(f(2) - 1.4142) < 1e-3"], "def f(x): return x ** 0.5", "def f(x): return x"),
    (["assert f(2) == (2, 4)"], "def f(x): return (x, 2 * x)", "def f(x): return [x, 2 * x]"),
    (["assert sorted(f([3, 1, 2])) == [1, 2, 3]"], "def f(x): return set(x)",
     "def f(x): return x[:1]"),
    (["assert f('a')[0] == 'A'", "assert f('b') in ('B', 'b')"], "def f(s): return s.upper()",
     "def f(s): return '!'"),
    (["assert f(1) is None"], "def f(x): pass", "def f(x): return 0"),
    (["assert sorted(f(), key=lambda t: -t) == [3, 2]"], "def f(): return [2, 3]",
     "def f(): return [3]"),
    (["x = [5, 6]\nexpected = 11\nassert f(x) == expected"], "def f(x): return sum(x)",
     "def f(x): return len(x)"),
    (["import math\nassert math.isclose(f(), math.pi)"], "import math\ndef f(): return math.pi",
     "def f(): return 3.14"),
    (["assert {f(0): 1} == {'0': 1}", "assert f(-1) != f(1)"], "def f(x): return str(x)",
     "def f(x): return 'x'"),
])
def test_code_assert_forms(tests, ok, wrong):
    assert code_score(fenced(ok), tests=tests) == 1.0
    assert code_score(fenced(wrong), tests=tests) < 1.0


def test_code_asserts_keep_expected_values_in_the_parent():
    from mopd_jax.data import code_tests

    plan = code_tests.plan_for({"tests": [
        "x = [5, 6]\nexpected = 11\nassert f(x) == expected",
        "def check(candidate):\n    assert candidate(2) == 4\n\ncheck(g)"]})
    sent = repr(plan.groups)
    assert "f(x)" in sent and "x = [5, 6]" in sent and "candidate(2)" in sent
    assert "11" not in sent and "== 4" not in sent and "expected" not in sent


@pytest.mark.parametrize("tests, message", [
    (["assert all(f(i) == i for i in range(3))"], "would run in the candidate's process"),
    (["for i in range(3):\n    assert f(i) == i"], "inside a loop"),
    (["x = f(1)"], "needs at least one assert"),
    (["assert f(1) =="], "invalid syntax"),
    ([{"call": "f(1)"}], "needs 'expected'"),
    ([{"stdin": 3}], "a case is"),
    ([{"input": "[1]", "output": "1", "testtype": "functional"}], "fn_name"),
])
def test_code_bad_test_formats(tests, message):
    with pytest.raises(RewardError, match=message):
        code_score(fenced(SOLUTION), tests=tests)
    with pytest.raises(RewardError, match="input_output must be"):
        get_reward("code")(SOLUTION, {"prompt": "p", "input_output": {"inputs": [1]}})


# --- OS isolation ----------------------------------------------------------------------------

PROBE = """
import json, os, socket
print(json.dumps({
    "uid": os.getuid(), "nets": [n for _, n in socket.if_nameindex()],
    "procs": len([p for p in os.listdir("/proc") if p.isdigit()]),
    "usr_readonly": bool(os.statvfs("/usr").f_flag & os.ST_RDONLY),  # the OS, not the guard
    "work_readonly": bool(os.statvfs(".").f_flag & os.ST_RDONLY),
    "root": sorted(os.listdir("/"))}))
"""


def test_isolation_auto_isolates_or_says_why():
    import json

    from mopd_jax.data import isolation as iso

    got = sandbox.resolve("auto")
    line = sandbox.describe("auto")
    assert line.startswith(f"auto -> {got}")
    r = sandbox.run_python(PROBE, isolation="auto")
    assert r.ok, r.stderr
    seen = json.loads(r.stdout)
    if got == "none":
        assert "in-process guard only" in line  # and why the OS modes did not run
        return
    assert seen["nets"] == ["lo"] and seen["procs"] <= 3  # no network; not the trainer's pids
    assert seen["usr_readonly"] and not seen["work_readonly"]
    assert seen["uid"] == (iso.NOBODY if os.geteuid() == 0 else os.getuid())
    assert "home" not in seen["root"] and "usr" in seen["root"]  # an allowlist, not the host
    # the limits still hold inside, with the same reasons
    r = sandbox.run_python("print('x' * 100_000)", max_output_bytes=1000, isolation="auto")
    assert r.killed_reason == "output limit"
    r = sandbox.run_python("x = []\nwhile True:\n    x.append(b'x' * 10_000_000)\n",
                           memory_mb=256, isolation="auto")
    assert r.killed_reason == "memory limit"
    r = sandbox.run_python("raise SystemExit(3)", isolation="auto")
    assert r.returncode == 3
    r = sandbox.run_python(BOMB, timeout_s=1.0, max_procs=8, isolation="auto")
    assert r.timed_out and 1 <= len(set(r.stdout.split())) <= 9


def test_isolation_unavailable_is_an_error(monkeypatch):
    from mopd_jax.data import isolation as iso

    monkeypatch.setattr(sandbox, "_resolved", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(RewardError, match="bwrap is not installed.*use auto / none"):
        rewards.configure(isolation="bwrap")
    assert sandbox.resolve("auto") == "none"
    assert "bwrap is not installed; unshare is not installed" in sandbox.describe("auto")
    with pytest.raises(iso.IsolationError, match="unknown mode 'docker'"):
        sandbox.resolve("docker")
    monkeypatch.setattr(sandbox, "_resolved", {})
    rewards.configure(isolation="auto")
