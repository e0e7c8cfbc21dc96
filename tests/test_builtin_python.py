"""The built-in ``python`` tool: notebook state, every limit stopped and reported with the exact
message the model reads, and the test process (the "server") unaffected."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from mlx_harmony_core.tools import BuiltinToolOptions, BuiltinTools, ToolCall

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the python tool needs fork")
RESET = "The python session was reset; variables and files from earlier calls are lost."


@pytest.fixture(scope="module")
def tools():
    opts = BuiltinToolOptions(
        python_timeout_s=2.0,
        python_cpu_s=30,
        python_output_chars=1000,
        python_file_mb=8,
        python_max_procs=16,
    )
    with BuiltinTools(["python"], opts) as t:
        yield t


def run(tools: BuiltinTools, code: str, session: str, timeout: float | None = None):
    result = tools.run(ToolCall("python", code, session), timeout)
    assert result.author == "python"
    assert result.details["code"] == code
    assert result.details["outputs"] == [{"type": "logs", "logs": result.text}]
    return result


def _features(tools: BuiltinTools, session: str) -> list[str]:
    return tools._python._sessions[session].features  # what the sandbox put in place


def _pids_of_uid(uid: int) -> set[int]:
    """Live processes whose real uid is ``uid``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    real = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if real == uid:
                pids.add(int(entry))
    return pids


def test_state_persists_across_calls(tools):
    r = run(tools, "x = 41\nprint('hi')\nx + 1", "state")
    assert (r.text, r.status) == ("hi\n42", "completed")
    r = run(tools, "x * 2", "state")
    assert (r.text, r.status) == ("82", "completed")
    r = run(tools, "y = 1", "state")
    assert r.text.startswith("[WARN] No output available.")
    # another conversation does not see it
    r = run(tools, "x", "other")
    assert r.text.endswith("NameError: name 'x' is not defined\n") and r.status == "failed"


def test_exception_is_its_traceback_and_the_session_survives(tools):
    run(tools, "z = 5", "exc")
    r = run(tools, "def f():\n    return 1 / 0\nf()", "exc")
    assert r.status == "failed"
    assert r.text.startswith('Traceback (most recent call last):\n  File "<cell 2>", line 3')
    assert r.text.endswith("ZeroDivisionError: division by zero\n")
    assert "_sandbox_worker" not in r.text  # none of our frames
    r = run(tools, "raise SystemExit(3)", "exc")
    assert r.text.endswith("SystemExit: 3\n")
    assert run(tools, "z", "exc").text == "5"


def test_runaway_loop_is_stopped_and_the_next_call_says_the_state_was_lost(tools):
    run(tools, "v = 1", "loop")
    t0 = time.monotonic()
    r = run(tools, "print('start')\nwhile True:\n    pass", "loop", timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert r.status == "incomplete"
    assert r.text == f"start\nExecution stopped: it ran past the time limit (1.0 s). {RESET}"
    r = run(tools, "v", "loop")
    assert r.text.startswith(
        "[The earlier python session was reset (it ran past the time limit (1.0 s)); "
        "variables and files from before are lost.]\nTraceback"
    )
    assert r.text.endswith("NameError: name 'v' is not defined\n")


def test_cpu_time_limit():
    opts = BuiltinToolOptions(python_timeout_s=20, python_cpu_s=1)
    with BuiltinTools(["python"], opts) as t:
        t0 = time.monotonic()
        r = t.run(ToolCall("python", "while True:\n    pass", "cpu"))
        assert time.monotonic() - t0 < 15
    assert r.status == "incomplete"
    assert r.text == f"Execution stopped: it used up its CPU time limit (1 s). {RESET}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NPROC checked on Linux")
def test_fork_bomb_is_stopped(tools):
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('stopped after', n, type(e).__name__)\n"
    )
    r = run(tools, code, "forks")
    assert "RLIMIT_NPROC" in _features(tools, "forks")
    assert r.status == "completed", r.text
    words = r.text.split()
    assert words[:2] == ["stopped", "after"] and words[3] == "BlockingIOError"
    assert int(words[2]) < 16
    # the classic one ignores the error and forks forever: the time limit ends the whole tree
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    uids = [int(f[4:]) for f in _features(tools, "forks") if f.startswith("uid=")]
    assert _pids_of_uid(uids[0]) if uids else True  # the sleeping children
    r = run(tools, bomb, "forks", timeout=1.5)
    assert r.text == f"Execution stopped: it ran past the time limit (1.5 s). {RESET}"
    if uids:  # root: the session ran as its own uid; nothing of it is left (killing and
        # reaping the namespace's processes is asynchronous: give the kernel a moment)
        deadline = time.monotonic() + 5
        while _pids_of_uid(uids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pids_of_uid(uids[0])
    # the test process can still start processes
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


def test_one_gigabyte_allocation_fails_inside(tools):
    run(tools, "keep = 7", "mem")
    r = run(tools, "b = bytearray(1 << 30)", "mem")
    assert r.status == "failed"
    assert r.text.endswith("MemoryError\n")
    assert run(tools, "keep", "mem").text == "7"


def test_huge_file_is_refused(tools):
    r = run(tools, "open('big.bin', 'wb').write(b'x' * (64 << 20))", "file")
    assert r.status == "failed"
    assert r.text.endswith("OSError: [Errno 27] File too large\n")
    # the working directory is the session's own, fresh one
    r = run(
        tools, "import os\nos.getcwd() == os.environ['HOME'], os.path.getsize('big.bin')", "file"
    )
    assert r.text == f"(True, {8 << 20})"


def test_printing_megabytes_is_truncated(tools):
    r = run(tools, "print('a' * 5_000_000)", "print")
    assert r.status == "completed"
    assert r.text == "a" * 1000 + "\n[... 4999001 more characters of output truncated ...]"
    r = run(tools, "for i in range(300_000):\n    print(i)", "print")
    assert r.text.startswith("0\n1\n2\n") and "more characters of output truncated" in r.text
    assert len(r.text) < 1100


def test_long_value_repr_is_truncated(tools):
    r = run(tools, "'b' * 5000", "repr")
    assert r.text == "'" + "b" * 999 + "\n[... repr truncated ...]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespace: Linux")
def test_network_is_unreachable(tools):
    with socket.socket() as server:  # reachable from here, not from the sandbox
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        r = run(tools, code, "net")
    if "network-namespace" not in _features(tools, "net"):
        pytest.skip("no network namespace here (see the README)")
    assert r.status == "failed"
    assert r.text.endswith("OSError: [Errno 101] Network is unreachable\n")


def test_sessions_cannot_touch_each_other(tools):
    run(tools, "secret = 42\nimport os", "victim")
    uid_a = run(tools, "os.getuid()", "victim").text
    r = run(tools, "import os, signal\nos.kill(-1, signal.SIGKILL)", "attacker")
    # kill(-1) reaches only what the attacker may signal: its own namespace/uid
    assert r.status in ("completed", "failed", "incomplete")
    assert run(tools, "secret", "victim").text == "42"
    if os.geteuid() == 0:
        assert run(tools, "import os; os.getuid()", "attacker2").text != uid_a


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process model")
def test_a_process_that_leaves_the_group_is_killed_too(tools):
    code = "import subprocess\nsubprocess.Popen(['setsid', 'sleep', '60'])\nimport os\nos.getuid()"
    r = run(tools, code, "setsid")
    uid = int(r.text)
    if os.geteuid() != 0:
        pytest.skip("checked by uid as root")
    tools.end_session("setsid")
    deadline = time.monotonic() + 5
    while _pids_of_uid(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pids_of_uid(uid)


def test_a_background_writer_does_not_hold_the_call(tools):
    t0 = time.monotonic()
    r = run(tools, "import subprocess\nsubprocess.Popen(['yes'])\n'started'", "yes")
    assert time.monotonic() - t0 < 3
    assert r.status == "completed" and r.text.endswith("'started'")
    tools.end_session("yes")  # ends `yes` too


def test_works_when_the_server_has_over_1024_open_files():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("cannot open 1200 files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with BuiltinTools(["python"]) as t:
            assert t.run(ToolCall("python", "6 * 7", "fds")).text == "42"
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_file_system_is_read_only_but_the_working_directory(tools):
    r = run(tools, "open('/tmp/x', 'w')", "fs")
    features = _features(tools, "fs")
    if "read-only-root" not in features or "tmpfs-workdir" not in features:
        pytest.skip("no private mount namespace here (see the README)")
    assert r.text.endswith("OSError: [Errno 30] Read-only file system: '/tmp/x'\n")
    r = run(tools, "open('notes.txt', 'w').write('kept')\nopen('notes.txt').read()", "fs")
    assert r.text == "'kept'"
    # /proc shows the sandbox's own processes only: its init and the REPL
    r = run(tools, "import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())", "fs")
    assert r.text == "[1, 2]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux capabilities")
def test_no_capabilities_and_no_remount(tools):
    code = (
        "import ctypes\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')]\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "rc = libc.mount(None, b'/', None, 32, None)  # MS_REMOUNT, read-write\n"
        "caps[0], rc, ctypes.get_errno()"
    )
    r = run(tools, code, "caps")
    if "mount-namespace" not in _features(tools, "caps"):
        pytest.skip("no private mount namespace here (see the README)")
    # nothing, or only CAP_DAC_READ_SEARCH (root server, Python install unreadable by others)
    assert r.text in ("('0000000000000000', -1, 1)", "('0000000000000004', -1, 1)")


def test_working_directory_space_is_bounded():
    opts = BuiltinToolOptions(python_disk_mb=16, python_file_mb=8)
    with BuiltinTools(["python"], opts) as t:
        code = "for i in range(4):\n    open(f'f{i}', 'wb').write(b'x' * (6 << 20))"
        r = t.run(ToolCall("python", code, "disk"))
        if "tmpfs-workdir" not in t._python._sessions["disk"].features:
            pytest.skip("no private mount namespace here (see the README)")
    assert r.text.endswith("OSError: [Errno 28] No space left on device\n")


def test_forged_replies_end_the_session(tools):
    run(tools, "w = 1", "forge")
    code = (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\xff' * 4)\n"
        "    except OSError:\n        pass\n"
    )
    r = run(tools, code, "forge")
    assert (r.status, r.text) == (
        "failed",
        "The python tool failed: the sandbox sent a malformed reply (the code wrote to its pipe)",
    )
    assert run(tools, "w", "forge").text.startswith(
        "[The earlier python session was reset (the sandbox sent a malformed reply"
    )


def test_process_exit_is_reported(tools):
    run(tools, "a = 1", "exit")
    r = run(tools, "import os\nos._exit(3)", "exit")
    assert r.status == "incomplete"
    assert r.text == f"Execution stopped: the Python process exited (code 3). {RESET}"


def test_pool_evicts_the_least_recently_used_and_idle_sessions_expire():
    opts = BuiltinToolOptions(python_max_sessions=2, python_idle_s=1.0)
    with BuiltinTools(["python"], opts) as t:
        for key in ("a", "b"):
            t.run(ToolCall("python", f"k = {key!r}", key))
        t.run(ToolCall("python", "k = 'c'", "c"))  # "a" goes
        assert t.run(ToolCall("python", "k", "b")).text == "'b'"
        r = t.run(ToolCall("python", "1", "a"))
        assert r.text == (
            "[The earlier python session was reset (it was ended to make room for other "
            "conversations); variables and files from before are lost.]\n1"
        )
        time.sleep(2.5)  # the reaper ends sessions idle for more than 1 s
        assert not t._python._sessions
        assert t.run(ToolCall("python", "2", "b")).text.startswith(
            "[The earlier python session was reset (it was idle too long)"
        )


def test_end_session_and_close_kill_the_processes():
    t = BuiltinTools(["python"])
    t.run(ToolCall("python", "q = 1", "one"))
    t.run(ToolCall("python", "q = 2", "two"))
    procs = [s.proc for s in t._python._sessions.values()]
    t.end_session("one")
    assert t.run(ToolCall("python", "q", "one")).text.endswith(
        "NameError: name 'q' is not defined\n"
    )
    t.close()
    assert all(p.poll() is not None for p in procs)
    assert t.run(ToolCall("python", "1", "two")).text == "The python tool has been shut down."


def test_concurrent_sessions(tools):
    results = {}

    def work(key: str) -> None:
        results[key] = run(tools, f"import time\ntime.sleep(0.3)\n{key!r} * 2", key).text

    threads = [threading.Thread(target=work, args=(f"par{i}",)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {f"par{i}": repr(f"par{i}" * 2) for i in range(3)}


def test_declaration_names_and_bad_calls():
    with pytest.raises(ValueError, match="did you mean 'python'"):
        BuiltinTools(["pyhton"])
    with pytest.raises(TypeError):
        BuiltinTools("python")  # type: ignore[arg-type]
    t = BuiltinTools(["python"], BuiltinToolOptions(python_timeout_s=7))
    try:
        import openai_harmony as oh

        content = t.system_content(oh.SystemContent.new())
        assert list(content.tools) == ["python"]
        description = content.tools["python"].description
        assert "time out after 7.0 seconds" in description
        from mlx_harmony_core.tools.python_sandbox import network_blocked

        internet = "disabled" if network_blocked() else "UNKNOWN"
        assert description.endswith(f"Internet access for this session is {internet}.")
        assert t.handles("python") and not t.handles("browser.search")
        r = t.run(ToolCall("browser.search", "{}", "s"))
        assert (r.status, r.text) == (
            "failed",
            "Unknown tool `browser.search`: the built-in tools enabled are python.",
        )
    finally:
        t.close()
