"""OS isolation for ``sandbox.run_python``: the candidate's process in its own namespaces.

Modes (``rewards.code.isolation``):

* ``none``: rlimits and the in-process audit-hook guard only (see ``sandbox``).
* ``bwrap``: bubblewrap builds the child's file system from the interpreter's directories and
  the system directories, read-only, plus the writable work dir; new network, pid, ipc and uts
  namespaces (no network at all); ``/tmp``, ``/home``, the data and the trainer are not there.
* ``unshare``: the same with util-linux ``unshare`` and a few ``mount(2)``/``chroot(2)`` calls
  that the sandbox bootstrap makes (``JAIL`` below) before any candidate code runs.
* ``auto``: the first of bwrap, unshare that works on this machine (each is tried once per
  process on a tiny program), else ``none``; ``describe`` says which for the run header.

In both OS modes a caller running as root drops the candidate to uid/gid 65534 (nobody); any
other caller is already unprivileged (its user namespace root gets no capabilities). The
candidate is never pid 1 of its namespace (pid 1 ignores default-action signals such as the
output limit's SIGXFSZ): a trusted reaper is, and it reports the candidate's wait status through
a pipe the candidate never holds. When the reaper exits the kernel kills everything left in the
namespace, so forked children cannot outlive the candidate.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig

MODES = ("auto", "none", "bwrap", "unshare")
NOBODY = 65534
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
NAMESPACES = "network, pid, ipc, uts and mount namespaces"


class IsolationError(ValueError):
    """An isolation mode that is unknown or does not work on this machine."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise IsolationError(f"rewards.code.isolation: unknown mode {mode!r}; choose one of "
                             f"{', '.join(MODES)}")
    return mode


@functools.lru_cache(maxsize=1)
def site_paths() -> tuple[str, ...]:
    """The interpreter's site-packages directories (the child runs without the site module)."""
    paths = sysconfig.get_paths()
    return tuple(dict.fromkeys(paths[k] for k in ("purelib", "platlib")))


@functools.lru_cache(maxsize=1)
def exposed_paths() -> tuple[str, ...]:
    """Read-only paths the candidate sees: system directories and the interpreter's own
    (stdlib, site-packages, prefixes); nothing else of the host file system."""
    paths = {p for p in _SYSTEM if os.path.lexists(p)}
    interp = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    interp |= {v for k, v in sysconfig.get_paths().items()
               if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    for p in interp:
        if os.path.isdir(p):
            paths.add(os.path.abspath(p))
            paths.add(os.path.realpath(p))
    # a path under another one comes with it (lexists: /lib may be a symlink, keep it)
    keep = sorted(p for p in paths
                  if not any(p != q and p.startswith(q.rstrip("/") + "/") and not
                             os.path.islink(q) for q in paths))
    return tuple(keep)


@functools.lru_cache(maxsize=1)
def read_allowed() -> tuple[str, ...]:
    """Path prefixes the in-process guard lets the candidate open for reading (besides its
    work dir and its own /proc entry): the same as ``exposed_paths`` plus a few devices."""
    return tuple(os.path.realpath(p) for p in exposed_paths()) + _DEVICES + (
        "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu")


def command(mode: str, argv: list[str], work: str, allow_network: bool) -> tuple[list, dict]:
    """(argv to spawn, bootstrap settings) for resolved ``mode`` ('none', 'bwrap', 'unshare')."""
    root = os.geteuid() == 0
    if mode == "none":
        return argv, {"jail": None, "reaper": False, "drop": None}
    drop = {"uid": NOBODY, "gid": NOBODY} if root else ("caps" if mode == "unshare" else None)
    if mode == "bwrap":
        cmd = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try"]
        if not allow_network:
            cmd.append("--unshare-net")
        if not root:
            cmd.append("--unshare-user")
        made = set()
        for p in exposed_paths() + (work,):
            # bwrap makes missing parents 0700 when run as root: make them 0755 first
            for parent in _ancestors(p):
                if parent not in made:
                    made.add(parent)
                    cmd += ["--perms", "0755", "--dir", parent]
            if p == work:
                cmd += ["--bind", work, work]
            elif os.path.islink(p):
                cmd += ["--symlink", os.readlink(p), p]
            else:
                cmd += ["--ro-bind", p, p]
        cmd += ["--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm", "--proc", "/proc",
                "--chdir", work, "--"]
        return cmd + argv, {"jail": None, "reaper": True, "drop": drop}
    if mode == "unshare":
        cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--ipc", "--uts"]
        if not allow_network:
            cmd.append("--net")
        if not root:
            cmd += ["--user", "--map-root-user"]
        expose = [[p, os.readlink(p) if os.path.islink(p) else None] for p in exposed_paths()]
        jail = {"new_root": os.path.join(os.path.dirname(work), "jail"), "work": work,
                "expose": expose, "devices": list(_DEVICES)}
        return cmd + ["--"] + argv, {"jail": jail, "reaper": True, "drop": drop}
    raise IsolationError(f"isolation mode {mode!r} is not resolved; call resolve() first")


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b']."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


# Runs in the sandbox bootstrap (root in fresh mount/pid/net namespaces made by `unshare`)
# before any candidate code: a tmpfs root holding read-only binds of the exposed paths, the
# devices, a private /dev/shm, a fresh /proc and the writable work dir; then chroot.
JAIL = r'''
def _jail(spec):
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = (
        1, 2, 4, 8, 32, 4096, 16384, 1 << 18)

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)):
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox jail: mount {src} on {dst}: {os.strerror(err)}")

    new = spec["new_root"]

    def place(path, is_dir):
        target = new + path
        os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
        if not is_dir:
            open(target, "a").close()
        return target

    mount(None, "/", None, REC | PRIVATE)
    os.makedirs(new, exist_ok=True)
    mount("tmpfs", new, "tmpfs", NOSUID | NODEV, "mode=755,size=16m")
    for path, link in spec["expose"]:
        if link is not None:
            os.makedirs(os.path.dirname(new + path), exist_ok=True)
            os.symlink(link, new + path)
            continue
        target = place(path, os.path.isdir(path))
        mount(path, target, None, BIND | REC)
        # keep the flags a user namespace may not clear (noexec, atime) as they are
        f = os.statvfs(target).f_flag
        keep = (f & (NOEXEC | 1024 | 2048)) | ((1 << 21) if f & 4096 else 0)
        mount(None, target, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | keep)
    for dev in spec["devices"]:
        if os.path.exists(dev):
            mount(dev, place(dev, False), None, BIND)
    mount("tmpfs", place("/dev/shm", True), "tmpfs", NOSUID | NODEV, "mode=1777,size=64m")
    mount("proc", place("/proc", True), "proc", NOSUID | NODEV | NOEXEC)
    work = spec["work"]
    mount(work, place(work, True), None, BIND)
    os.chroot(new)
    os.chdir(work)


def _drop_privileges(drop):
    """After the jail, before any candidate code: no new privileges, no capabilities, and
    uid/gid nobody when the caller was root."""
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if isinstance(drop, dict):
        os.setgroups([])
        os.setresgid(drop["gid"], drop["gid"], drop["gid"])
        os.setresuid(drop["uid"], drop["uid"], drop["uid"])  # uid 0 -> n: capabilities cleared
    elif drop == "caps":  # root of our own user namespace: shed its capabilities
        for cap in range(64):
            if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP until EINVAL (no such cap)
                break

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()):
            raise OSError(ctypes.get_errno(), "sandbox: capset failed")
'''
