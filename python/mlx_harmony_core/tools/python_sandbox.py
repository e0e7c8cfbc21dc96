"""The built-in ``python`` tool: a stateful, sandboxed Python process per conversation.

Each session is one process tree started from :mod:`._sandbox_worker` (which isolates itself
before running anything: namespaces, rlimits, an unused uid as root). The pool is bounded
(least recently used idle session goes first) and idle sessions expire. A call that hits a
limit kills its session; the next call in that conversation starts fresh and says so.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .options import BuiltinToolOptions
from .results import ToolResult, truncate

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("_sandbox_worker.py")
NO_OUTPUT = (
    "[WARN] No output available. Use print() to output anything to stdout to receive the output"
)
MALFORMED = "the sandbox sent a malformed reply (the code wrote to its pipe)"
# macOS: Seatbelt profile that denies every network operation (the rest is allowed).
MACOS_PROFILE = "(version 1)(allow default)(deny network*)"
UID_SLOTS = 10_000  # uids per server process (more than python_max_sessions allows)
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uid_slot = itertools.count()


def _claim_uid() -> int | None:
    """An unused uid for a root server's session: unique among this process's live sessions
    (two sessions sharing one could signal each other and share the process limit); a high,
    unnamed range offset by the server's pid. None when not root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    base = 2_000_000_000 + (os.getpid() % 100_000) * UID_SLOTS
    with _uid_lock:
        for _ in range(UID_SLOTS):
            uid = base + next(_uid_slot) % UID_SLOTS  # round robin: a freed uid rests longest
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError("no free sandbox uid")


def _release_uid(uid: int | None) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)  # type: ignore[arg-type]


def _readable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can reach and read ``path`` (every parent folder
    searchable by others, the file readable)."""
    try:
        path = path.resolve()
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _install_readable() -> bool:
    """Can an unprivileged uid import the standard library and the installed packages?"""
    import pydantic  # an installed package (site-packages), next to numpy & co.

    return _readable_by_others(Path(os.__file__)) and _readable_by_others(Path(pydantic.__file__))


@functools.lru_cache(maxsize=1)
def network_blocked() -> bool:
    """Whether sandboxed code gets no network here: Linux when a network namespace can be
    made (probed once in a throwaway process), macOS when ``sandbox-exec`` exists."""
    if sys.platform == "darwin":
        return shutil.which("sandbox-exec") is not None
    if not sys.platform.startswith("linux"):
        return False
    flags = "0x40000000" if os.geteuid() == 0 else "0x50000000"  # NEWNET (| NEWUSER)
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"
    try:
        return subprocess.run([sys.executable, "-I", "-c", probe], timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` ready to read (or at EOF) within ``timeout`` seconds. poll, not
    select: a busy server's fds can be above select's limit of 1024."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (a session's own uid, as root, when no
    PID namespace holds its processes). Each is signalled through a pidfd opened before its
    uid is read, so a reused pid can never be hit."""
    if uid < 2_000_000_000 or not hasattr(os, "pidfd_open"):
        return
    for _ in range(5):  # what was forking meanwhile is caught by the next pass
        hit = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fd = os.pidfd_open(int(entry))
            except OSError:
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    real = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
                if real == uid:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    hit += 1
            except (OSError, StopIteration, ValueError):
                pass
            finally:
                os.close(fd)
        if not hit:
            return


def _signal_reason(code: int | None, opts: BuiltinToolOptions) -> str:
    """Why the session's process ended, in words for the model."""
    if code is not None and code > 128:
        sig = code - 128
        if sig == signal.SIGXCPU:
            return f"it used up its CPU time limit ({opts.python_cpu_s} s)"
        if sig == signal.SIGKILL:
            return "it was killed (memory or CPU limit)"
        with contextlib.suppress(ValueError):
            return f"it was killed by {signal.Signals(sig).name}"
    return f"the Python process exited (code {code})"


class _Session:
    """One live sandboxed interpreter; its methods run under the session's lock."""

    def __init__(self, key: str, opts: BuiltinToolOptions) -> None:
        self.key = key
        self.opts = opts
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.workdir = tempfile.mkdtemp(prefix="mhc-python-")
        self.features: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.uid: int | None = None
        self._buf = b""

    def start(self, deadline: float) -> None:
        """Start the process and wait for it to report its sandbox is in place."""
        self.uid = _claim_uid()
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        cfg = {
            "req_fd": req_r,
            "resp_fd": resp_w,
            "workdir": self.workdir,
            "cpu_s": self.opts.python_cpu_s,
            "memory_mb": self.opts.python_memory_mb,
            "file_mb": self.opts.python_file_mb,
            "disk_mb": self.opts.python_disk_mb,
            "max_procs": self.opts.python_max_procs,
            "output_chars": self.opts.python_output_chars,
            "uid": self.uid,
            "keep_read": not _install_readable(),
        }
        cmd = [sys.executable, "-I", str(WORKER), json.dumps(cfg)]
        if sys.platform == "darwin" and shutil.which("sandbox-exec"):
            cmd = ["sandbox-exec", "-p", MACOS_PROFILE, *cmd]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.workdir,
            "TMPDIR": self.workdir,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "MPLBACKEND": "Agg",
            # one BLAS thread: fewer processes/threads against RLIMIT_NPROC, less memory
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(req_r, resp_w),
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            os.close(req_r)
            os.close(resp_w)
        assert self.proc.stdout is not None
        self.out_fd = self.proc.stdout.fileno()
        hello, out, _ = self._wait_reply(deadline)
        if hello is None or not hello.get("ready"):
            self.kill()
            raise RuntimeError(f"the python sandbox did not start: {out.strip()[-2000:]}")
        self.features = list(hello.get("features", []))

    def _wait_reply(self, deadline: float) -> tuple[dict | None, str, int]:
        """Read output and the next reply until the reply, EOF or the deadline.

        Returns (reply or None, output kept, characters of output dropped)."""
        limit = self.opts.python_output_chars
        kept: list[bytes] = []
        kept_n = dropped = 0
        fds = [self.resp_r, self.out_fd]
        reply = None
        while reply is None:
            # the reply frame may already be buffered
            if len(self._buf) >= 4:
                n = struct.unpack(">I", self._buf[:4])[0]
                # the code can write to this pipe too: a frame larger than any real reply (two
                # capped strings, JSON-escaped) or not an object ends the session
                if n > 16 * limit + 65536:
                    raise RuntimeError(MALFORMED)
                if len(self._buf) >= 4 + n:
                    try:
                        reply = json.loads(self._buf[4 : 4 + n].decode("utf-8"))
                    except ValueError:
                        reply = None
                    self._buf = self._buf[4 + n :]
                    if not isinstance(reply, dict):
                        raise RuntimeError(MALFORMED)
                    break
            left = deadline - time.monotonic()
            if left <= 0 or self.resp_r not in fds:
                break
            for fd in _readable(fds, left):
                data = os.read(fd, 1 << 16)
                if fd == self.resp_r:
                    if not data:
                        fds.remove(fd)  # the process died
                    self._buf += data
                elif not data:
                    fds.remove(fd)
                elif kept_n < limit * 4:  # bytes; decoded and cut to chars below
                    kept.append(data)
                    kept_n += len(data)
                else:
                    dropped += len(data)
        # what was written before the reply is already in the pipe: take it too (bounded: a
        # process the code left running may keep writing)
        for _ in range(64):
            if self.out_fd not in fds or not _readable([self.out_fd], 0):
                break
            data = os.read(self.out_fd, 1 << 16)
            if not data:
                break
            if kept_n < limit * 4:
                kept.append(data)
                kept_n += len(data)
            else:
                dropped += len(data)
        text = b"".join(kept).decode("utf-8", "replace")
        if len(text) > limit:
            dropped += len(text) - limit
            text = text[:limit]
        return reply, text, dropped

    def execute(self, code: str, timeout: float, remaining: float) -> tuple[str, str, str | None]:
        """Run one cell: (text for the model, status, reason the session ended or None)."""
        deadline = time.monotonic() + remaining
        body = json.dumps({"code": code}).encode("utf-8")
        self._send(struct.pack(">I", len(body)) + body, deadline)
        reply, out, dropped = self._wait_reply(deadline)
        if dropped and reply is not None:
            out += f"\n[... {dropped} more characters of output truncated ...]"
        if reply is not None:
            parts = [p for p in (out.rstrip("\n"), reply.get("value"), reply.get("error")) if p]
            text = "\n".join(parts) if parts else NO_OUTPUT
            return (
                truncate(text, self.opts.python_output_chars + 200),
                ("failed" if reply.get("error") else "completed"),
                None,
            )
        if time.monotonic() >= deadline:
            out, dropped = self._last_output(out, dropped)
            if dropped:
                out += f"\n[... {dropped} more characters of output truncated ...]"
            self.kill()
            reason = f"it ran past the time limit ({timeout:.1f} s)"
        else:
            reason = _signal_reason(self.kill(exiting=True), self.opts)
        msg = (
            f"Execution stopped: {reason}. The python session was reset; "
            "variables and files from earlier calls are lost."
        )
        return (f"{out.rstrip()}\n{msg}" if out.strip() else msg), "incomplete", reason

    def _last_output(self, out: str, dropped: int) -> tuple[str, int]:
        """At the time limit: ask the REPL to flush what it printed (SIGUSR1) and take it."""
        if self.proc is None:
            return out, dropped
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGUSR1)
        _, more, more_dropped = self._wait_reply(time.monotonic() + 0.2)
        room = self.opts.python_output_chars - len(out)
        return out + more[:room], dropped + more_dropped + max(0, len(more) - room)

    def _send(self, data: bytes, deadline: float) -> None:
        """Write a request without blocking past the deadline (the pipe may be full)."""
        os.set_blocking(self.req_w, False)
        while data and time.monotonic() < deadline:
            try:
                data = data[os.write(self.req_w, data) :]
            except BlockingIOError:
                poller = select.poll()
                poller.register(self.req_w, select.POLLOUT)
                poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            except OSError:
                return  # the process is gone; the reply wait reports why

    def terminate(self) -> None:
        """Signal the process tree to die (safe while another thread is in a call)."""
        if self.proc is not None and self.proc.returncode is None:  # not reaped: pid is ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def kill(self, exiting: bool = False) -> int | None:
        """Stop the whole process tree (the PID namespace dies with its init); the exit code.
        ``exiting``: the process is already dying (its pipe closed): let it say how first."""
        code = None
        if self.proc is not None:
            if exiting:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.proc.wait(timeout=2)
            # the group too: without namespaces, what the code forked is only in W's group
            # (a group id is not reused while any member lives)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=5) if code is None else code
            if code is not None and code < 0:
                code = 128 - code
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            if "pid-namespace" not in self.features and self.uid is not None:
                _kill_uid(self.uid)  # a process that left the group (setsid) still has the uid
        for fd in ("req_w", "resp_r"):
            with contextlib.suppress(AttributeError, OSError):
                os.close(getattr(self, fd))
                setattr(self, fd, -1)
        for _ in range(3):  # processes of a killed namespace may still be exiting
            shutil.rmtree(self.workdir, ignore_errors=True)
            if not os.path.exists(self.workdir):
                break
            time.sleep(0.05)
        _release_uid(self.uid)
        self.uid = None
        return code


class PythonSandbox:
    """The pool of python sessions keyed by conversation; thread-safe, never raises in run."""

    def __init__(self, options: BuiltinToolOptions) -> None:
        if not hasattr(os, "fork"):
            raise ValueError("the python tool needs Linux or macOS (it sandboxes a forked process)")
        self.opts = options
        self._sessions: dict[str, _Session] = {}
        self._lost: dict[str, str] = {}  # session -> why its state was lost
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        self._logged_features = False

    def run(self, code: str, session: str, timeout: float | None = None) -> ToolResult:
        """Run ``code`` in the session's interpreter; the result is what the model reads."""
        t0 = time.monotonic()
        limit = (
            self.opts.python_timeout_s
            if timeout is None
            else min(timeout, self.opts.python_timeout_s)
        )
        details = {"code": code, "outputs": []}
        sess, note = self._acquire(session, t0 + limit)
        if isinstance(sess, str):  # no session could be had: the message says why
            return ToolResult("python", sess, "failed", time.monotonic() - t0, details)
        fresh = sess.proc is None
        try:
            if fresh:
                sess.start(t0 + limit)
                self._log_features(sess)
            text, status, reason = sess.execute(
                code, limit, max(0.01, limit - (time.monotonic() - t0))
            )
        except Exception as exc:  # noqa: BLE001 - the model reads it; the server goes on
            if str(exc) == MALFORMED:
                logger.warning("python tool: session %s: %s", session, exc)
            else:
                logger.exception("python tool: session %s failed to run code", session)
            sess.kill()
            text, status = f"The python tool failed: {exc}", "failed"
            reason = None if fresh else str(exc)
            self._drop(session, sess, reason)
        finally:
            sess.last_used = time.monotonic()
            sess.lock.release()
        if reason is not None:
            self._drop(session, sess, reason)
        if note:
            text = f"{note}\n{text}"
        details["outputs"] = [{"type": "logs", "logs": text}]
        return ToolResult("python", text, status, time.monotonic() - t0, details)

    def _acquire(self, key: str, deadline: float) -> tuple[_Session | str, str]:
        """The session for ``key``, locked (started lazily), and a note for the model when its
        earlier state was lost; or a message saying why none is available."""
        with self._lock:
            if self._closed.is_set():
                return "The python tool has been shut down.", ""
            sess = self._sessions.get(key)
            note = ""
            if sess is None:
                if len(self._sessions) >= self.opts.python_max_sessions and not self._evict():
                    return (
                        f"Too many python sessions are busy (limit "
                        f"{self.opts.python_max_sessions}); try again later.",
                        "",
                    )
                sess = self._sessions[key] = _Session(key, self.opts)
                if key in self._lost:
                    note = (
                        f"[The earlier python session was reset ({self._lost.pop(key)}); "
                        "variables and files from before are lost.]"
                    )
            self._start_reaper()
        if not sess.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return "The previous python call of this conversation is still running.", ""
        return sess, note

    def _evict(self) -> bool:
        """Under the pool lock: end the least recently used idle session; False if all busy."""
        for sess in sorted(self._sessions.values(), key=lambda s: s.last_used):
            if sess.lock.acquire(blocking=False):
                try:
                    self._sessions.pop(sess.key, None)
                    self._lost[sess.key] = "it was ended to make room for other conversations"
                    sess.kill()
                finally:
                    sess.lock.release()
                logger.info("python tool: session %s evicted (pool full)", sess.key)
                return True
        return False

    def _drop(self, key: str, sess: _Session, reason: str | None) -> None:
        """Forget a dead session; ``reason``: why its state was lost (told on the next call)."""
        with self._lock:
            if self._sessions.get(key) is sess:
                del self._sessions[key]
                if reason is not None:
                    self._lost[key] = reason
            while len(self._lost) > 10 * self.opts.python_max_sessions:
                self._lost.pop(next(iter(self._lost)))

    def _log_features(self, sess: _Session) -> None:
        if not self._logged_features:
            self._logged_features = True
            logger.info("python tool sandbox: %s", ", ".join(sess.features) or "rlimits only")
            if "pid-namespace" not in sess.features and sys.platform.startswith("linux"):
                logger.warning(
                    "python tool: no namespaces here (%s): no network isolation",
                    ", ".join(sess.features),
                )

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(
                target=self._reap, name="python-tool-reaper", daemon=True
            )
            self._reaper.start()

    def _reap(self) -> None:
        """End sessions idle longer than ``python_idle_s``."""
        period = min(30.0, self.opts.python_idle_s / 2)
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [
                    s
                    for s in self._sessions.values()
                    if now - s.last_used > self.opts.python_idle_s
                ]
            for sess in idle:
                if sess.lock.acquire(blocking=False):
                    try:
                        if time.monotonic() - sess.last_used > self.opts.python_idle_s:
                            self._drop(sess.key, sess, "it was idle too long")
                            sess.kill()
                            logger.info("python tool: session %s expired (idle)", sess.key)
                    finally:
                        sess.lock.release()

    def end_session(self, key: str) -> None:
        """End a conversation's interpreter (its variables and files go)."""
        with self._lock:
            sess = self._sessions.pop(key, None)
            self._lost.pop(key, None)
        if sess is None:
            return
        if sess.lock.acquire(blocking=False):
            try:
                sess.kill()
            finally:
                sess.lock.release()
        else:
            sess.terminate()  # the running call sees its process die, reports it, cleans up

    def close(self) -> None:
        """Kill every sandbox process."""
        self._closed.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for sess in sessions:
            if sess.lock.acquire(timeout=0.1):
                try:
                    sess.kill()
                finally:
                    sess.lock.release()
            else:
                sess.terminate()
