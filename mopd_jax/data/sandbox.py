"""Run untrusted Python (model-written code) in a throw-away subprocess; failures become results.

``run_python`` starts a fresh ``python -I -B`` in a temporary directory (deleted afterwards) with
a scrubbed environment, stdin on ``/dev/null``, stdout/stderr going to files capped by
``RLIMIT_FSIZE``, and its own session, so the whole process group is SIGKILLed on timeout and
again after a normal exit (forked children never outlive the call). Before the candidate runs, a
small bootstrap in the child sets resource limits and installs a ``sys.addaudithook`` guard.

Layers, strongest first:

* OS limits (``resource.setrlimit``, set by the bootstrap rather than a ``preexec_fn``, which
  is unsafe in a threaded caller): ``RLIMIT_AS`` (memory, per process: each fork may use
  ``memory_mb`` too), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (output and files), ``RLIMIT_CORE`` = 0,
  ``RLIMIT_NOFILE`` and, for a non-root caller, ``RLIMIT_NPROC`` = the user's current task count
  + ``max_procs`` (the kernel counts every thread of the user, so a fixed small value would fail
  when the trainer itself runs many threads). Root is exempt from ``RLIMIT_NPROC``.
* Process-group SIGKILL on timeout and at exit; a wall-clock timeout independent of CPU time.
* The audit-hook guard (in-process, best effort): no network (``socket.connect``/``bind``/
  ``sendto``/``sendmsg``/``getaddrinfo``/``gethostbyname``... raise ``PermissionError``), no exec
  of other programs (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``), at most
  ``max_procs`` ``os.fork`` calls across the whole process tree (an unlinked counter file shared
  by every fork; this is what bounds a fork bomb when the caller is root), no writes, renames or
  deletes outside the temporary directory, no signals outside the candidate's process group, no
  ``ctypes`` foreign calls, and ``os.setsid``/``setpgid``/``setpgrp`` removed so children cannot
  leave the group.

The guard runs inside the candidate's interpreter, so deliberately adversarial code can get past
it (e.g. by reloading built-in modules or corrupting memory); it stops the mistakes model-written
code actually makes. For untrusted code at scale add OS isolation: a network namespace
(``unshare --net`` / a container without network), an unprivileged uid (so ``RLIMIT_NPROC``
applies), cgroup ``pids.max``/``memory.max``, or a sandbox such as nsjail or gVisor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time

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
               max_output_bytes: int = _MIB) -> SandboxResult:
    """Run ``code`` as ``__main__`` of a sandboxed ``python -I``; see the module docstring.

    ``max_procs`` is the number of extra processes the code may fork (0 forbids forking);
    ``max_output_bytes`` caps stdout, stderr and any file the code writes (exceeding it kills
    the process: 'output limit'). Only bad arguments raise (``ValueError``).
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
    try:
        with tempfile.TemporaryDirectory(prefix="mopd-sandbox-", ignore_cleanup_errors=True) as d:
            return _run(code, os.path.realpath(d), timeout_s, memory_mb, max_procs,
                        allow_network, max_output_bytes)
    except OSError as e:  # no disk space, no fds, no /tmp, ...: a result, not a crash
        return SandboxResult(None, "", "", False, f"spawn failed: {e}")


def _run(code, root, timeout_s, memory_mb, max_procs, allow_network, max_output_bytes):
    main = os.path.join(root, "main.py")
    with open(main, "w", encoding="utf-8", errors="replace") as f:
        f.write(code)
    cpu_s = int(timeout_s) + 1
    limits = [("RLIMIT_AS", memory_mb * _MIB, memory_mb * _MIB),
              ("RLIMIT_CPU", cpu_s, cpu_s + 1),  # soft: SIGXCPU, hard: SIGKILL
              ("RLIMIT_FSIZE", max_output_bytes, max_output_bytes),
              ("RLIMIT_CORE", 0, 0),
              ("RLIMIT_NOFILE", 256, 256)]
    if os.getuid() != 0:
        tasks = _user_task_count(os.getuid())
        if tasks is not None:
            limits.append(("RLIMIT_NPROC", tasks + max_procs + 1, tasks + max_procs + 1))
    cfg = dict(root=root, main=main, limits=limits, max_procs=max_procs,
               allow_network=allow_network)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": root, "TMPDIR": root,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out_path, err_path = os.path.join(root, ".stdout"), os.path.join(root, ".stderr")
    # The child's fork counter: the bootstrap opens it by this name and unlinks it; our fd tells
    # afterwards whether anything forked (and needs waiting for).
    counter = os.open(os.path.join(root, ".forks"),
                      os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_APPEND, 0o600)
    with (open(out_path, "wb") as out, open(err_path, "wb") as err,
          os.fdopen(counter, "rb") as forks):
        try:
            # No preexec_fn: it is unsafe in a threaded caller; the bootstrap sets the limits.
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(cfg)],
                cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True)
        except (OSError, subprocess.SubprocessError) as e:
            return SandboxResult(None, "", "", False, f"spawn failed: {e}")
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
    stdout = _read_capped(out_path, max_output_bytes)
    stderr = _read_capped(err_path, max_output_bytes)
    return SandboxResult(proc.returncode, stdout, stderr, timed_out,
                         _killed_reason(proc.returncode, timed_out, stderr))


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
_BOOTSTRAP = r'''
def _sandbox_main():
    import json, os, resource, signal, sys
    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: die at the output cap
    for name, soft, hard in cfg["limits"]:
        res = getattr(resource, name)
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    root = cfg["root"]
    counter_path = os.path.join(root, ".forks")  # created empty by the parent
    counter = os.open(counter_path, os.O_RDWR | os.O_APPEND)
    os.unlink(counter_path)
    st = os.fstat(counter)
    with open(cfg["main"], "rb") as f:
        source = f.read()

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

    def inside(path, dir_fd=None, _root=root, _prefix=root + os.sep, _join=os.path.join,
               _realpath=os.path.realpath, _fsdecode=os.fsdecode):
        if isinstance(path, int):
            path = f"/proc/self/fd/{path}"
        path = _fsdecode(path)
        if dir_fd is not None and not path.startswith("/"):
            path = _join(f"/proc/self/fd/{dir_fd}", path)
        path = _realpath(path)
        return path == _root or path.startswith(_prefix) or path == "/dev/null"

    def hook(event, args, _net=net, _denied=denied, _paths=paths, _path_events=path_events,
             _wf=write_flags,
             _inside=inside, _counter=counter, _ident=(st.st_dev, st.st_ino),
             _max=cfg["max_procs"], _write=os.write, _fstat=os.fstat, _getpgid=os.getpgid,
             _getpgrp=os.getpgrp, _Denied=PermissionError):
        if event == "open":
            if (not isinstance(args[0], int) and isinstance(args[2], int) and args[2] & _wf
                    and not _inside(args[0])):
                raise _Denied(f"sandbox: writing outside the sandbox directory: {args[0]!r}")
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
              and (args[0] is hook or args[0] is _inside)):
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
    main.__dict__.pop("_sandbox_main", None)
    main.__file__ = cfg["main"]
    sys.argv = [cfg["main"]]
    exec(code, main.__dict__)

_sandbox_main()
'''
