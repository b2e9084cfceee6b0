"""One request must not stop the daemon (issue 17): the attacks as a client sends them.

The attacker is uid 65534 with nothing but a stdlib socket client (the system's
``/usr/bin/python3`` run through ``setpriv``; the venv's interpreter is out of its
reach), against a daemon run as root with ``--allow-uid 65534 --socket-mode 0666``.
Attacks that need no other uid are sent by the test itself on a plain socket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import Client, EmbeddedDaemon
from daemon import protocol, server

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # stdlib only, and uid 65534 may run it
HELLO = b'{"id": 1, "op": "hello", "args": {"version": 1}}\n'
STATUS = b'{"id": 2, "op": "status", "args": {}}\n'
as_another_user = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK) or not shutil.which("setpriv"),
    reason="needs root, setpriv and a system python that uid 65534 may run")


def start(*args: str) -> tuple[EmbeddedDaemon, Path]:
    """A daemon under a directory other users may traverse (pytest's are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="branchd-attack-"))
    root.chmod(0o755)
    try:
        return EmbeddedDaemon(root, args=list(args)).start(), root
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def stop(d: EmbeddedDaemon, root: Path) -> None:
    d.stop()
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@pytest.fixture(scope="module")
def shared() -> Iterator[EmbeddedDaemon]:
    """The issue's set-up: uid 65534 allowed, and the socket open to it."""
    d, root = start("--allow-uid", str(NOBODY), "--socket-mode", "0666",
                    "--socket-group", "nogroup")
    try:
        yield d
    finally:
        stop(d, root)


def daemon_pid(d: EmbeddedDaemon) -> int:
    assert d.proc is not None
    return d.proc.pid


def limit_fds(d: EmbeddedDaemon, n: int) -> None:
    """Soft and hard open-file limits of the running daemon, as systemd's 1024 default."""
    subprocess.run(["prlimit", f"--pid={daemon_pid(d)}", f"--nofile={n}:{n}"], check=True)


def open_fds(d: EmbeddedDaemon) -> int:
    return len(os.listdir(f"/proc/{daemon_pid(d)}/fd"))


def answers(d: EmbeddedDaemon, within: float = 5.0) -> bool:
    """Whether a fresh client gets ``status`` answered in time."""
    try:
        with Client(d.socket, timeout=within) as client:
            return client.call("status")["pid"] == daemon_pid(d)
    except Exception:
        return False


def exchange(path: Path, *lines: bytes, timeout: float = 10) -> list[dict]:
    """Send raw lines on a fresh connection; every response until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        for line in lines:
            s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines()]


def as_nobody(script: str, *args: str, timeout: float = 60) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/")


# --- socket access ---------------------------------------------------------------------

@as_another_user
def test_socket_mode_and_group_are_honoured_and_reported(shared: EmbeddedDaemon) -> None:
    st = os.stat(shared.socket)
    assert stat.S_IMODE(st.st_mode) == 0o666 and st.st_gid == NOBODY
    with Client(shared.socket) as client:
        status = client.call("status")
    assert status["socket_mode"] == "0666" and status["socket_group"] == "nogroup"
    assert status["allowed_uids"] == [0, NOBODY]
    hello = as_nobody(
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"id\":1,\"op\":\"hello\",\"args\":{\"version\":1}}\\n')\n"
        "print(s.recv(4096).decode())", str(shared.socket))
    out, err = hello.communicate(timeout=30)
    assert json.loads(out)["ok"], err


# --- one request stops the daemon ------------------------------------------------------

def test_diff_patch_of_a_fifo_does_not_stall_the_daemon(shared: EmbeddedDaemon,
                                                        tmp_path: Path) -> None:
    # the base holds a FIFO that the branch replaced by a file: the patch's old side
    os.mkfifo(tmp_path / "pipe")
    with Client(shared.socket) as client:
        client.call("workspace-add", path=str(tmp_path))
        path = Path(client.call("create", workspace=str(tmp_path), name="fifo")["path"])
    (path / "pipe").unlink()
    (path / "pipe").write_text("a regular file in the branch\n")
    diffed: list[dict] = []
    req = json.dumps({"id": 2, "op": "diff", "args": {"workspace": str(tmp_path),
                                                      "name": "fifo", "patch": True}})
    diff = threading.Thread(target=lambda: diffed.extend(
        exchange(shared.socket, HELLO, req.encode() + b"\n", timeout=60)), daemon=True)
    diff.start()
    try:
        time.sleep(0.5)  # the diff is in the daemon
        responsive = answers(shared)
    finally:
        try:  # an old daemon sits in open() of the FIFO: a writer lets it go
            os.close(os.open(tmp_path / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        diff.join(60)
    assert responsive, "status did not answer while a diff --patch met a FIFO"
    assert diffed[1]["ok"], diffed
    assert any(c["path"] == "pipe" for c in diffed[1]["result"]["changes"])


def test_deeply_nested_json_is_a_protocol_error(shared: EmbeddedDaemon) -> None:
    nested = b"[" * 200_000 + b"\n"
    [first] = exchange(shared.socket, nested)
    assert first["error"]["code"] == "protocol"
    assert answers(shared)
    later = exchange(shared.socket, HELLO, nested, STATUS)
    assert later[0]["ok"] and later[1]["error"]["code"] == "protocol", later[1]
    assert later[2]["ok"] and later[2]["id"] == 2  # the connection goes on
    assert answers(shared)


_HOLD = """
import json, select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
held, failed = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)  # blocking: a full backlog waits, not EAGAIN
    try:
        s.connect(path)
    except OSError:
        failed += 1
        s.close()
        continue
    held.append(s)
poll = select.poll()
by_fd = {s.fileno(): s for s in held}
for fd in by_fd:
    poll.register(fd, select.POLLIN)
busy, deadline = 0, time.monotonic() + 3
while by_fd and time.monotonic() < deadline:
    for fd, _ in poll.poll(100):
        poll.unregister(fd)
        try:
            busy += b'"busy"' in by_fd.pop(fd).recv(4096)
        except OSError:
            pass
print(json.dumps({"held": len(held), "failed": failed, "busy": busy}), flush=True)
sys.stdin.read()  # hold the rest until the test is done
"""


@as_another_user
def test_idle_connections_of_one_uid_are_capped(shared: EmbeddedDaemon) -> None:
    limit_fds(shared, 1024)  # systemd's default soft limit, and the unit's before
    attacker = as_nobody(_HOLD, str(shared.socket), "1100")
    try:
        assert attacker.stdout is not None
        report = json.loads(attacker.stdout.readline() or "{}")
        alive = answers(shared)
    finally:
        attacker.communicate(timeout=30)
    assert alive, "the daemon stopped answering under 1100 idle connections"
    assert report["held"] + report["failed"] == 1100, report
    assert report["busy"] >= 1100 - server.MAX_CONNECTIONS_PER_UID, report
    deadline = time.monotonic() + 10
    while open_fds(shared) >= 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(shared) < 200  # what the attacker held is closed again


def test_a_flood_of_passed_descriptors_closes_that_connection(shared: EmbeddedDaemon) -> None:
    limit_fds(shared, 1024)
    before = open_fds(shared)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
            open("/dev/null") as null:
        s.connect(str(shared.socket))
        s.sendall(HELLO)
        s.settimeout(10)
        s.recv(4096)
        try:
            for _ in range(125):
                socket.send_fds(s, [b" "], [null.fileno()] * server.MAX_FDS)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed it: what this test wants
        held = open_fds(shared)
        data = s.recv(65536)
    assert held <= before + server.MAX_HELD_FDS + 1
    assert b'"protocol"' in data and b"descriptors" in data
    assert answers(shared)


# running out of descriptors is what the test provokes: the daemon says so, and waits
@pytest.mark.daemon_log_allows(
    r"ERROR daemon\.server: cannot accept a connection: Too many open files; retrying")
def test_out_of_descriptors_pauses_accept_instead_of_exiting(tmp_path: Path) -> None:
    d, root = start()
    held: list[socket.socket] = []
    try:
        limit_fds(d, open_fds(d) + 10)
        for _ in range(60):  # all queue in the listen backlog; the daemon takes ten
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            held.append(s)
        time.sleep(1.5)
        assert d.proc is not None and d.proc.poll() is None, "the daemon exited on EMFILE"
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 30
        while not answers(d, within=2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answers(d), "the daemon did not accept again once descriptors were free"
        log = d.log_path.read_text()
        # once per shortage, not at every retry (15 in the 1.5 s above)
        assert 1 <= log.count("cannot accept a connection") <= 2, log[-2000:]
    finally:
        for s in held:
            s.close()
        stop(d, root)


# --- lower -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["two\nlines", "a\tb", "\u202egnp.exe", "esc\x1b[31m",
                                  "zero\u200bwidth", "line\u2028sep", "del\x7f"])
def test_control_and_format_characters_make_a_bad_name(shared: EmbeddedDaemon,
                                                      tmp_path: Path, name: str) -> None:
    env = {**os.environ, "BRANCHD_SOCKET": str(shared.socket)}
    proc = subprocess.run([sys.executable, "-m", "branching.cli", "create", name,
                           "-w", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == protocol.ExitCode.USAGE, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with Client(shared.socket) as client:
        assert client.call("list", workspace=str(tmp_path))["branches"] == []
    assert name not in shared.log_path.read_text()  # no forged log line either


@pytest.mark.parametrize("version", ["true", "1.0", '"1"'])
def test_hello_takes_only_the_integer_version(shared: EmbeddedDaemon, version: str) -> None:
    line = b'{"id": 1, "op": "hello", "args": {"version": %s}}\n' % version.encode()
    [resp] = exchange(shared.socket, line)
    assert resp["error"]["code"] == "protocol" and "version" in resp["error"]["message"]


def test_a_huge_integer_is_a_bad_request(shared: EmbeddedDaemon) -> None:
    huge = b'{"id": %s, "op": "status", "args": {}}\n' % (b"9" * 5000)
    [first] = exchange(shared.socket, huge)
    assert first["error"]["code"] == "bad-request"
    later = exchange(shared.socket, HELLO, huge, STATUS)
    assert later[1]["error"]["code"] == "bad-request" and later[2]["ok"]
    assert answers(shared)


def test_nul_in_argv_is_a_bad_request(shared: EmbeddedDaemon, tmp_path: Path) -> None:
    with Client(shared.socket) as client:
        client.call("workspace-add", path=str(tmp_path))
        client.call("create", workspace=str(tmp_path), name="argvnul")
        req = json.dumps({"id": 2, "op": "exec", "args": {
            "workspace": str(tmp_path), "name": "argvnul", "argv": ["/bin/echo", "a\0b"]}})
        [_, resp] = exchange(shared.socket, HELLO, req.encode() + b"\n")
    assert resp["error"]["code"] == "bad-request", resp
    assert "Traceback" not in shared.log_path.read_text()


# --- timeouts --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def impatient() -> Iterator[EmbeddedDaemon]:
    d, root = start("--idle-timeout", "1")
    try:
        yield d
    finally:
        stop(d, root)


def until_closed(path: Path, *lines: bytes, timeout: float) -> tuple[float, list[dict]]:
    """Send lines, keep the connection open; how long until the daemon closed it, and
    what it said."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        for line in lines:
            s.sendall(line)
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return time.monotonic() - t0, [json.loads(x) for x in data.splitlines()]


def test_silent_connection_is_closed_after_the_hello_timeout(impatient: EmbeddedDaemon) -> None:
    took, [resp] = until_closed(impatient.socket, timeout=server.HELLO_TIMEOUT + 10)
    assert server.HELLO_TIMEOUT - 1 < took < server.HELLO_TIMEOUT + 5
    assert resp["error"]["code"] == "unavailable" and "hello" in resp["error"]["message"]


def test_idle_connection_is_closed_but_not_one_with_a_run_in_flight(
        impatient: EmbeddedDaemon, tmp_path: Path) -> None:
    with Client(impatient.socket) as client:
        client.call("workspace-add", path=str(tmp_path))
        client.call("create", workspace=str(tmp_path), name="slow")
        run = client.call("exec", workspace=str(tmp_path), name="slow",
                          argv=["/bin/sleep", "2.5"], detach=True)["run"]
        waited = client.call("wait", run=run)  # 2.5 s idle on the wire, a request in flight
        assert waited["result"]["returncode"] == 0, waited
        time.sleep(2.5)  # idle, nothing in flight: the daemon closes it
        assert client.call("status")["pid"]  # and the client opens a new one by itself
    took, [hello, bye] = until_closed(impatient.socket, HELLO, timeout=10)
    assert hello["ok"] and 0.5 < took < 5
    assert bye["error"]["code"] == "unavailable"
