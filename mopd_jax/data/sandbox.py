"""Run untrusted Python (model-written code) in a throw-away subprocess; failures become results.

``run_python`` starts a fresh ``python -I -B -S`` whose work dir is a temporary directory (deleted
afterwards), with a scrubbed environment, stdin on ``/dev/null``, stdout/stderr going to files
capped by ``RLIMIT_FSIZE``, and its own session, so the whole process group is SIGKILLed on
timeout and again after a normal exit (forked children never outlive the call). The program
reaches the child on its stdin, read by a small bootstrap that then sets resource limits and
installs a ``sys.addaudithook`` guard before the candidate runs (no ``site`` module: the
bootstrap puts site-packages on ``sys.path`` itself, and starts several times faster). The
program file, the output files and the fork counter live beside the work dir, not in it.

Layers, strongest first:

* OS isolation, ``isolation='bwrap' | 'unshare' | 'auto'`` (see ``isolation``): no network,
  a file system of read-only system and interpreter directories plus the writable work dir,
  its own pid namespace, uid nobody when the caller is root.
* OS limits (``resource.setrlimit``, set by the bootstrap rather than a ``preexec_fn``, which
  is unsafe in a threaded caller): ``RLIMIT_AS`` (memory, per process: each fork may use
  ``memory_mb`` too), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (output and files), ``RLIMIT_CORE`` = 0,
  ``RLIMIT_NOFILE`` and, unless the candidate runs as root, ``RLIMIT_NPROC`` = its user's
  current task count + ``max_procs`` (the kernel counts every thread of the user, so a fixed
  small value would fail when the trainer itself runs many threads). Root is exempt from
  ``RLIMIT_NPROC``; under OS isolation a root caller's candidate runs as nobody, so it applies.
* Process-group SIGKILL on timeout and at exit; a wall-clock timeout independent of CPU time.
* The audit-hook guard (in-process, best effort): no network (``socket.connect``/``bind``/
  ``sendto``/``sendmsg``/``getaddrinfo``/``gethostbyname``... raise ``PermissionError``), no exec
  of other programs (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``), at most
  ``max_procs`` ``os.fork`` calls across the whole process tree (an unlinked counter file shared
  by every fork; this is what bounds a fork bomb when the caller is root), no writes, renames or
  deletes outside the work dir, no reads outside it and the interpreter's and system
  directories (so neither the data nor another process's ``/proc`` entry can be read), no
  signals outside the candidate's process group, no ``ctypes`` foreign calls, and
  ``os.setsid``/``setpgid``/``setpgrp`` removed so children cannot leave the group.

The guard runs inside the candidate's interpreter, so deliberately adversarial code can get past
it (e.g. by reloading built-in modules or corrupting memory); it stops the mistakes model-written
code actually makes. Against adversaries use OS isolation (``auto`` picks it where the machine
allows), and judge results outside the candidate's process (``code_judge`` does: nothing the
child prints is trusted). Beyond that: cgroup ``pids.max``/``memory.max``, or nsjail / gVisor.
"""

from __future__ import annotations

import dataclasses
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from mopd_jax.data import isolation as iso

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one ``run_python`` call; never an exception."""

    returncode: int | None
    """Exit status; negative = killed by that signal; None = the child could not be started."""
    stdout: str
    """Decoded (UTF-8, errors replaced), at most ``max_output_bytes`` long."""
    stderr: str
    timed_out: bool
    """The wall-clock ``timeout_s`` passed and the process group was killed."""
    killed_reason: str | None
    """'timeout', 'cpu time limit', 'output limit', 'memory limit', 'signal NAME',
    'spawn failed: ...', or None when the program ended by itself."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               max_procs: int = 16, allow_network: bool = False,
               max_output_bytes: int = _MIB, isolation: str = "none") -> SandboxResult:
    """Run ``code`` as ``__main__`` of a sandboxed ``python -I``; see the module docstring.

    ``max_procs`` is the number of extra processes the code may fork (0 forbids forking);
    ``max_output_bytes`` caps stdout, stderr and any file the code writes (exceeding it kills
    the process: 'output limit'); ``isolation`` is one of ``isolation.MODES``. Only bad
    arguments (``ValueError``) and an OS mode that does not work here (``IsolationError``)
    raise.
    """
    if not isinstance(code, str):
        raise ValueError(f"run_python: code must be a str, got {type(code).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"run_python: timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"run_python: memory_mb must be >= 32 (the interpreter needs it), "
                         f"got {memory_mb}")
    if max_procs < 0:
        raise ValueError(f"run_python: max_procs must be >= 0, got {max_procs}")
    if max_output_bytes < 1:
        raise ValueError(f"run_python: max_output_bytes must be >= 1, got {max_output_bytes}")
    return run_resolved(code, resolve(isolation), timeout_s=timeout_s, memory_mb=memory_mb,
                        max_procs=max_procs, allow_network=allow_network,
                        max_output_bytes=max_output_bytes)


def run_resolved(code: str, mode: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
                 max_procs: int = 16, allow_network: bool = False,
                 max_output_bytes: int = _MIB) -> SandboxResult:
    """``run_python`` with ``mode`` already resolved ('none', 'bwrap', 'unshare') and the
    arguments already checked."""
    try:
        with tempfile.TemporaryDirectory(prefix="mopd-sandbox-", ignore_cleanup_errors=True) as d:
            return _run(code, os.path.realpath(d), mode, timeout_s, memory_mb, max_procs,
                        allow_network, max_output_bytes)
    except OSError as e:  # no disk space, no fds, no /tmp, ...: a result, not a crash
        return SandboxResult(None, "", "", False, f"spawn failed: {e}")


def _run(code, d, mode, timeout_s, memory_mb, max_procs, allow_network, max_output_bytes):
    work = os.path.join(d, "work")
    os.mkdir(work)
    main = os.path.join(d, "main.py")
    with open(main, "w", encoding="utf-8", errors="replace") as f:
        f.write(code)
    # -S: no site module (its .pth processing, e.g. an editable install's finder, is most of
    # the start-up time); the bootstrap puts site-packages on sys.path itself.
    argv, boot = iso.command(mode, [sys.executable, "-I", "-B", "-S", "-c", _BOOTSTRAP], work,
                             allow_network)
    drop = boot["drop"]
    uid = drop["uid"] if isinstance(drop, dict) else os.getuid()
    if isinstance(drop, dict):
        os.chown(work, drop["uid"], drop["gid"])
    cpu_s = int(timeout_s) + 1
    limits = [("RLIMIT_AS", memory_mb * _MIB, memory_mb * _MIB),
              ("RLIMIT_CPU", cpu_s, cpu_s + 1),  # soft: SIGXCPU, hard: SIGKILL
              ("RLIMIT_FSIZE", max_output_bytes, max_output_bytes),
              ("RLIMIT_CORE", 0, 0),
              ("RLIMIT_NOFILE", 256, 256)]
    if uid != 0:
        tasks = _user_task_count(uid)
        if tasks is not None:  # + the candidate, + its reaper under OS isolation
            limits.append(("RLIMIT_NPROC", tasks + max_procs + 2, tasks + max_procs + 2))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out_path, err_path = os.path.join(d, "stdout"), os.path.join(d, "stderr")
    # The child's fork counter: an unlinked file shared by every fork (the bootstrap gets the
    # fd); our fd tells afterwards whether anything forked (and needs waiting for).
    counter_path = os.path.join(d, "forks")
    counter = os.open(counter_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_APPEND, 0o600)
    os.unlink(counter_path)
    status_r, status_w = os.pipe() if boot["reaper"] else (None, None)
    cfg = dict(work=work, main=main, limits=limits, max_procs=max_procs, site=iso.site_paths(),
               allow_network=allow_network, counter=counter, status_fd=status_w,
               readable=iso.read_allowed(), **boot)
    with (open(main, "rb") as program, open(out_path, "wb") as out, open(err_path, "wb") as err,
          os.fdopen(counter, "rb") as forks):
        try:
            # No preexec_fn: it is unsafe in a threaded caller; the bootstrap sets the limits.
            proc = subprocess.Popen(
                argv + [repr(cfg)], cwd=work, env=env, stdin=program, stdout=out,
                stderr=err, start_new_session=True, close_fds=True,
                pass_fds=(counter,) + ((status_w,) if status_w is not None else ()))
        except (OSError, subprocess.SubprocessError) as e:
            for fd in (status_r, status_w):
                if fd is not None:
                    os.close(fd)
            return SandboxResult(None, "", "", False, f"spawn failed: {e}")
        if status_w is not None:
            os.close(status_w)
        timed_out = True
        try:
            timed_out = not _wait_exit(proc.pid, timeout_s)
        finally:
            # The leader is exited-but-unreaped here, so its group id cannot be reused yet.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            if os.fstat(forks.fileno()).st_size:
                _wait_group_dead(proc.pid, timeout_s=1.0)
    returncode = proc.returncode
    if status_r is not None:  # the reaper's report of the candidate's wait status
        with os.fdopen(status_r, "rb") as status:
            reported = status.read(32)
        if reported.isdigit() and not timed_out:
            returncode = os.waitstatus_to_exitcode(int(reported))
    stdout = _read_capped(out_path, max_output_bytes)
    stderr = _read_capped(err_path, max_output_bytes)
    return SandboxResult(returncode, stdout, stderr, timed_out,
                         _killed_reason(returncode, timed_out, stderr))


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait (without reaping) until ``pid`` exits; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()  # not select.select: the caller may hold fds >= 1024
            poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    if poller.poll(left * 1000):
                        return True
                except InterruptedError:
                    continue
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped elsewhere (e.g. SIGCHLD ignored): it has exited
            return True
        time.sleep(0.005)
    return False


def _wait_group_dead(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group ``pgid`` still runs (SIGKILL is delivered asynchronously;
    zombies left for init to reap are fine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return
        alive = False
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue
            if int(pgrp) == pgid and state not in "ZX":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.005)


def _read_capped(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _killed_reason(returncode: int | None, timed_out: bool, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if returncode is None or returncode == 0:
        return None
    if returncode > 0:
        return "memory limit" if "MemoryError" in stderr[-2000:] else None
    sig = -returncode
    if sig == signal.SIGXCPU:
        return "cpu time limit"
    if sig == signal.SIGXFSZ:
        return "output limit"
    try:
        return f"signal {signal.Signals(sig).name}"
    except ValueError:
        return f"signal {sig}"


def _user_task_count(uid: int) -> int | None:
    """Threads the kernel counts against ``uid``'s RLIMIT_NPROC; None if /proc is unreadable."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue  # exited meanwhile
    return total


# Runs in the child as `python -I -B -c _BOOTSTRAP CONFIG_JSON`, before any candidate code. The
# hook reads only positional defaults bound at install time (an immutable tuple), so candidate
# code cannot rebind what it uses; replacing __code__/__defaults__ raises an audit event the
# hook denies.
_BOOTSTRAP = iso.JAIL + r'''
def _sandbox_main():
    # no json, signal or site: their imports (re, enum, ...) would be most of the start-up
    import _signal, os, resource, sys
    cfg = eval(sys.argv[-1], {"__builtins__": {}})  # our own repr() of plain data
    sys.path.extend(p for p in cfg["site"] if p not in sys.path)
    chunks = []
    while True:  # the program arrives on stdin; the candidate then gets /dev/null
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    source = b"".join(chunks)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if cfg["jail"] is not None:
        _jail(cfg["jail"])
    if cfg["reaper"]:
        # Under OS isolation this process may be pid 1 of its namespace, which ignores
        # default-action signals: it only reaps; the candidate runs in its child.
        pid = os.fork()
        if pid:
            while True:
                try:
                    status = os.waitpid(pid, 0)[1]
                    break
                except InterruptedError:
                    continue
            os.write(cfg["status_fd"], str(status).encode())
            os._exit(0)
        os.close(cfg["status_fd"])
    if cfg["drop"] is not None:
        _drop_privileges(cfg["drop"])
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)  # Python ignores it: die at the cap
    for name, soft, hard in cfg["limits"]:
        res = getattr(resource, name)
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    root = cfg["work"]
    counter = cfg["counter"]
    st = os.fstat(counter)

    net = frozenset(() if cfg["allow_network"] else (
        "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyaddr",
        "socket.gethostbyname", "socket.getnameinfo", "socket.sendmsg", "socket.sendto",
        "socket.sethostname"))
    denied = frozenset((
        "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function"))
    # (event, ((path arg, dir_fd arg or -1), ...)) for calls that change the file system;
    # tuples, not a dict, so the candidate cannot edit them in place
    paths = (("os.remove", ((0, 1),)), ("os.rmdir", ((0, 1),)), ("os.mkdir", ((0, 2),)),
             ("os.chmod", ((0, 2),)), ("os.chown", ((0, 3),)), ("os.utime", ((0, 3),)),
             ("os.truncate", ((0, -1),)), ("os.rename", ((0, 2), (1, 3))),
             ("os.link", ((0, 2), (1, 3))), ("os.symlink", ((1, 2),)),
             ("os.setxattr", ((0, -1),)), ("os.removexattr", ((0, -1),)),
             ("os.chflags", ((0, -1),)), ("shutil.rmtree", ((0, 1),)))
    path_events = frozenset(name for name, _ in paths)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    readable = tuple(p.rstrip("/") for p in cfg["readable"])

    def resolve(path, dir_fd=None, _join=os.path.join, _realpath=os.path.realpath,
                _fsdecode=os.fsdecode):
        if isinstance(path, int):
            path = f"/proc/self/fd/{path}"
        path = _fsdecode(path)
        # audit events pass dir_fd -1 when none was given
        if isinstance(dir_fd, int) and dir_fd >= 0 and not path.startswith("/"):
            path = _join(f"/proc/self/fd/{dir_fd}", path)
        return _realpath(path)

    def inside(path, dir_fd=None, _root=root, _prefix=root + os.sep, _resolve=resolve):
        path = _resolve(path, dir_fd)
        return path == _root or path.startswith(_prefix) or path == "/dev/null"

    def may_read(path, _inside=inside, _resolve=resolve, _readable=readable,
                 _getpid=os.getpid):
        if _inside(path):
            return True
        path = _resolve(path)
        if path.startswith(f"/proc/{_getpid()}/"):
            return True
        return any(path == p or path.startswith(p + "/") for p in _readable)

    def hook(event, args, _net=net, _denied=denied, _paths=paths, _path_events=path_events,
             _wf=write_flags, _inside=inside, _may_read=may_read,
             _counter=counter, _ident=(st.st_dev, st.st_ino),
             _max=cfg["max_procs"], _write=os.write, _fstat=os.fstat, _getpgid=os.getpgid,
             _getpgrp=os.getpgrp, _Denied=PermissionError):
        if event == "open":
            if isinstance(args[0], int):
                pass  # an fd it already holds
            elif isinstance(args[2], int) and args[2] & _wf:
                if not _inside(args[0]):
                    raise _Denied(f"sandbox: writing outside the sandbox directory: {args[0]!r}")
            elif not _may_read(args[0]):
                raise _Denied(f"sandbox: reading outside the sandbox and the interpreter: "
                              f"{args[0]!r}")
        elif event in _path_events:
            for i, d in next(spec for name, spec in _paths if name == event):
                if i < len(args) and not _inside(args[i], args[d] if 0 <= d < len(args) else None):
                    raise _Denied(f"sandbox: {event} outside the sandbox directory: {args[i]!r}")
            if event == "os.truncate" and args[0] == _counter:
                raise _Denied("sandbox: os.truncate of the process counter")
        elif event in _net:
            raise _Denied(f"sandbox: network access is disabled ({event})")
        elif event in _denied:
            raise _Denied(f"sandbox: {event} is not allowed")
        elif event in ("os.fork", "os.forkpty"):
            try:  # one byte per fork in a file shared by the whole tree: a global bound
                _write(_counter, b"x")
                s = _fstat(_counter)
                ok = (s.st_dev, s.st_ino) == _ident and s.st_size <= _max
            except OSError:
                ok = False
            if not ok:
                raise _Denied(f"sandbox: process limit reached (max_procs={_max})")
        elif event in ("os.kill", "os.killpg"):
            target, own = args[0], _getpgrp()
            if event == "os.killpg":
                ok = target in (0, own)
            elif target <= 0:
                ok = target == 0 or -target == own
            else:
                try:
                    ok = _getpgid(target) == own
                except OSError:
                    ok = True  # no such process: the kill fails by itself
            if not ok:
                raise _Denied("sandbox: signals outside the sandbox's process group")
        elif (event in ("object.__setattr__", "object.__delattr__")
              and (args[0] is hook or args[0] is _inside or args[0] is _may_read
                   or args[0] is resolve)):
            raise _Denied("sandbox: the guard cannot be modified")

    import posix, _posixsubprocess
    for mod in (os, posix):
        for name in ("setsid", "setpgid", "setpgrp"):
            mod.__dict__.pop(name, None)

    def _no_fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting programs is not allowed")
    _posixsubprocess.fork_exec = _no_fork_exec
    sys.addaudithook(hook)

    code = compile(source, cfg["main"], "exec")
    main = sys.modules["__main__"]
    for name in ("_sandbox_main", "_jail", "_drop_privileges"):
        main.__dict__.pop(name, None)
    main.__file__ = cfg["main"]
    sys.argv = [cfg["main"]]
    exec(code, main.__dict__)

_sandbox_main()
'''


# ------------------------------------------------ which isolation runs on this machine
_resolved: dict[str, tuple[str, str | None]] = {}  # mode -> (mode that runs, why not)
_lock = threading.Lock()

# What a working OS sandbox must show: no network interface but lo, an unwritable /, no
# trainer in /proc, an unprivileged uid (or no capabilities), a writable work dir.
_PROBE = r"""
import os, socket
ok = [name for _, name in socket.if_nameindex()] == ["lo"]
try:
    open("/mopd-isolation-probe", "w")
    ok = False
except OSError:
    pass
open("probe.txt", "w").write("x")
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff:")][0].split()[1]
ok = ok and int(caps, 16) == 0 and len([p for p in os.listdir("/proc") if p.isdigit()]) <= 3
print("isolated" if ok else "not isolated")
"""


def available(mode: str) -> tuple[bool, str]:
    """(works, reason): whether OS mode ``mode`` runs the probe program correctly here."""
    exe = mode
    if shutil.which(exe) is None:
        return False, f"{exe} is not installed"
    r = run_resolved(_PROBE, mode, timeout_s=10.0)
    if r.ok and r.stdout.strip() == "isolated":
        return True, "ok"
    why = (r.stderr.strip().splitlines() or [r.stdout.strip() or r.killed_reason or "?"])[-1]
    return False, f"{exe} did not isolate the probe ({why[:200]})"


def resolve(mode: str) -> str:
    """The mode that runs for requested ``mode``: 'auto' -> bwrap, unshare or none (cached);
    an explicit OS mode that does not work here raises ``IsolationError`` with the reason."""
    iso.check_mode(mode)
    with _lock:
        if mode not in _resolved:
            if mode == "none":
                _resolved[mode] = ("none", None)
            elif mode == "auto":
                why = []
                for m in ("bwrap", "unshare"):
                    ok, reason = available(m)
                    if ok:
                        _resolved[mode] = (m, None)
                        break
                    why.append(reason)
                else:
                    _resolved[mode] = ("none", "; ".join(why))
            else:
                ok, reason = available(mode)
                _resolved[mode] = (mode, None) if ok else ("", reason)
        got, why = _resolved[mode]
    if not got:
        raise iso.IsolationError(f"rewards.code.isolation={mode}: {why}; install it, run where "
                             "namespaces are allowed, or use auto / none")
    return got


def describe(mode: str) -> str:
    """One line for the run header: which isolation ``mode`` gives here, and why."""
    got = resolve(mode)
    head = f"{mode} -> {got}" if mode == "auto" else got
    if got == "none":
        why = _resolved["auto"][1] if mode == "auto" else "requested"
        return (f"{head} (rlimits and the in-process guard only: {why})")
    who = f"uid {iso.NOBODY}" if os.geteuid() == 0 else "caller's unprivileged uid"
    return (f"{head} ({iso.NAMESPACES}; read-only system and interpreter dirs, only the work "
            f"dir writable; {who})")
