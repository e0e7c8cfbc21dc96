"""The sandboxed process behind the built-in ``python`` tool (standard library only).

Run as ``python -I _sandbox_worker.py CONFIG_JSON`` by :mod:`.python_sandbox`, never
imported for its side effects. It isolates itself before it runs any of the model's code:

1. Linux: new network, PID and mount namespaces (plus a user namespace when not root). The
   first child is the namespace's init; when it dies the kernel kills everything left inside,
   so killing this process (init gets ``PR_SET_PDEATHSIG``) stops every process the code
   forked. Init makes every mount read-only, mounts a private /proc and a size-limited tmpfs
   on the working directory.
2. The REPL process sets its resource limits (CPU, address space, file size, processes, no
   core files), and as root switches to an unused uid so ``RLIMIT_NPROC`` is enforced
   (the kernel exempts uid 0) and the code cannot signal or write what that uid does not own.
3. It reads cells (length-prefixed JSON) on ``req_fd`` and answers on ``resp_fd``; the code's
   stdout/stderr go to fd 1/2, which the parent reads and caps.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import json
import linecache
import os
import resource
import select
import signal
import struct
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
# NOROOT, NO_SETUID_FIXUP, KEEP_CAPS and NO_CAP_AMBIENT_RAISE, each with its lock
SECUREBITS_LOCKED_DOWN = 0xFF & ~(1 << 4)
SIGKILL = 9


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def read_msg(fd: int) -> dict | None:
    """One length-prefixed JSON message, or None at end of file."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body.decode("utf-8"))


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def write_msg(fd: int, msg: dict) -> None:
    """Write one length-prefixed JSON message."""
    body = json.dumps(msg).encode("utf-8")
    data = struct.pack(">I", len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(features: list[str]) -> bool:
    """Unshare network + PID (+ user when unprivileged) namespaces, then a mount namespace;
    True when the first worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        features.append(f"no-namespaces(errno={ctypes.get_errno()})")
        return False
    if not root:
        # Map ourselves to root inside: required to own the new network namespace.
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")
        features.append("user-namespace")
    features += ["network-namespace", "pid-namespace"]
    # A private mount namespace, only if its propagation can be cut from the host's first
    # (else a mount made inside would appear outside): then init mounts (see private_mounts).
    if libc.unshare(CLONE_NEWNS) == 0 and _mount(libc, None, "/", None, MS_REC | MS_PRIVATE):
        features.append("mount-namespace")
    return True


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> bool:
    """mount(2); True when it worked."""

    def enc(v: str | None) -> bytes | None:
        return None if v is None else v.encode()

    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    return libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


def private_mounts(cfg: dict, features: list[str]) -> None:
    """In the namespace's init, inside the private mount namespace: every mount read-only,
    /proc showing only the sandbox's processes, the working directory a size-limited tmpfs
    (the only writable place), a small tmpfs /dev/shm. Each step is skipped if refused."""
    libc = _libc()

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]

    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(b"/"),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc == 0:
        features.append("read-only-root")
    if _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC):
        features.append("private-proc")
    owner = cfg.get("uid") if os.geteuid() == 0 else None
    opts = f"size={int(cfg['disk_mb'])}m,mode=0700" + (f",uid={owner},gid={owner}" if owner else "")
    if _mount(libc, "tmpfs", cfg["workdir"], "tmpfs", MS_NOSUID | MS_NODEV, opts):
        features.append("tmpfs-workdir")
    if os.path.isdir("/dev/shm"):
        _mount(libc, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")


def set_limits(cfg: dict, features: list[str]) -> None:
    """Resource limits for the REPL process and everything it starts."""

    def lim(name: str, soft: int, hard: int | None = None) -> None:
        what = getattr(resource, name, None)
        if what is None:
            return
        try:
            resource.setrlimit(what, (soft, soft if hard is None else hard))
            features.append(name)
        except (ValueError, OSError):
            pass  # e.g. macOS refuses RLIMIT_AS; the README says what each OS gets

    lim("RLIMIT_CORE", 0)
    # Soft limit -> SIGXCPU (reported as such); the hard one a second later -> SIGKILL.
    lim("RLIMIT_CPU", int(cfg["cpu_s"]), int(cfg["cpu_s"]) + 1)
    lim("RLIMIT_AS", int(cfg["memory_mb"]) << 20)
    lim("RLIMIT_FSIZE", int(cfg["file_mb"]) << 20)
    # RLIMIT_NPROC counts every process of the real uid: only safe to lower inside our own
    # user namespace or as the unused uid root switches to (else it counts the user's others).
    if "user-namespace" in features or (os.geteuid() == 0 and cfg.get("uid") is not None):
        lim("RLIMIT_NPROC", int(cfg["max_procs"]))


def drop_privileges(cfg: dict, features: list[str]) -> None:
    """As root: become an unused uid/gid (RLIMIT_NPROC does not bind uid 0). When the Python
    install is not readable by other users (e.g. under /root), keep CAP_DAC_READ_SEARCH so
    imports work: the code can then read (never write) every file, as root could."""
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        # setuid binaries (su, sudo) and file capabilities cannot raise privileges any more
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        features.append("no-new-privs")
    if os.geteuid() != 0 or cfg.get("uid") is None:
        return
    uid = int(cfg["uid"])
    os.chown(cfg["workdir"], uid, uid)
    keep_read = bool(cfg.get("keep_read")) and libc is not None
    if keep_read:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    features.append(f"uid={uid}")
    if keep_read:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
        bit = 1 << CAP_DAC_READ_SEARCH
        data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset(CAP_DAC_READ_SEARCH) failed")
        # ambient: a subprocess (e.g. another python) can read the install too
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0)
        features.append("CAP_DAC_READ_SEARCH")


def drop_capabilities(features: list[str]) -> None:
    """In our own user namespace the REPL is its root, with every capability there (it could
    remount the file system writable): drop them all, for good (securebits: uid 0 gains none
    back through exec)."""
    libc = _libc()
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    if libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot lock the securebits")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "cannot drop capabilities")
    features.append("no-capabilities")


def run_cell(code: str, ns: dict, name: str, max_chars: int) -> str | None:
    """Execute a cell like a notebook: the last expression's repr is returned (None if the
    cell does not end in an expression or its value is None)."""
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    tree = ast.parse(code, name, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, name, "exec"), ns)
    if last is None:
        return None
    value = eval(compile(last, name, "eval"), ns)
    if value is None:
        return None
    ns["_"] = value
    text = repr(value)
    return text if len(text) <= max_chars else text[:max_chars] + "\n[... repr truncated ...]"


def format_error(exc: BaseException) -> str:
    """The traceback from the first frame of the model's code on (none of ours)."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _flush(*_: object) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


def repl(req_fd: int, resp_fd: int, max_chars: int) -> None:
    """Serve cells until the parent closes the request pipe."""
    ns: dict = {"__name__": "__main__", "__builtins__": builtins}
    me = os.getpid()
    out, err = sys.stdout, sys.stderr
    # stdout is block-buffered (printing is cheap); before a time-limit kill the parent sends
    # SIGUSR1 so the output so far is flushed and reaches the model
    signal.signal(signal.SIGUSR1, _flush)
    n = 0
    while True:
        msg = read_msg(req_fd)
        if msg is None:
            os._exit(0)
        n += 1
        sys.stdout, sys.stderr = out, err  # the previous cell may have replaced them
        value = error = None
        try:
            value = run_cell(msg["code"], ns, f"<cell {n}>", max_chars)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the notebook survives
            error = format_error(exc)[-max_chars:]
        if os.getpid() != me:
            _flush()
            os._exit(0)  # a process the cell forked finished the cell: it must not answer
        _flush()
        write_msg(resp_fd, {"value": value, "error": error})


def _init_and_wait(child: int) -> None:
    """PID 1 of the namespace: reap orphans until the REPL exits, then exit like it."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def main() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # only the REPL acts on it (see repl)
    cfg = json.loads(sys.argv[1])
    req_fd, resp_fd = int(cfg["req_fd"]), int(cfg["resp_fd"])
    features: list[str] = []
    if enter_namespaces(features):
        alive_r, alive_w = os.pipe()  # EOF once this process is gone
        init = os.fork()
        if init:  # stay outside as the process the parent holds; exit like the namespace
            os.close(req_fd)
            os.close(resp_fd)
            _, status = os.waitpid(init, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)
        os.close(alive_w)
        _libc().prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)  # the outer process died before the death signal was armed
        os.close(alive_r)
        if "mount-namespace" in features:
            private_mounts(cfg, features)
        child = os.fork()
        if child:
            os.close(req_fd)
            os.close(resp_fd)
            _init_and_wait(child)
    os.chdir(cfg["workdir"])
    set_limits(cfg, features)
    drop_privileges(cfg, features)
    if "user-namespace" in features:
        drop_capabilities(features)
    write_msg(resp_fd, {"ready": True, "features": features, "pid": os.getpid()})
    repl(req_fd, resp_fd, int(cfg["output_chars"]))


if __name__ == "__main__":
    main()
