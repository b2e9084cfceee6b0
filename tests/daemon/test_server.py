"""The control server under hostile input: it answers with protocol errors and stays up."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branching import BranchError, Client, EmbeddedDaemon
from daemon import protocol

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def exchange(path: Path, *lines: bytes) -> list[dict]:
    """Send raw lines on a fresh connection; return every response until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        for line in lines:
            s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines()]


HELLO = b'{"id": 1, "op": "hello", "args": {"version": 1}}\n'


def assert_alive(daemon: EmbeddedDaemon) -> None:
    with Client(daemon.socket) as client:
        assert client.call("status")["version"] == protocol.VERSION


def test_socket_mode_is_0660(daemon: EmbeddedDaemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660


def test_request_before_hello_is_refused(daemon: EmbeddedDaemon) -> None:
    [resp] = exchange(daemon.socket, b'{"id": 5, "op": "list", "args": {}}\n')
    assert resp["error"]["code"] == "protocol" and "hello" in resp["error"]["message"]
    assert_alive(daemon)


def test_wrong_version_is_refused(daemon: EmbeddedDaemon) -> None:
    [resp] = exchange(daemon.socket, b'{"id": 1, "op": "hello", "args": {"version": 99}}\n')
    assert resp["error"]["code"] == "protocol" and "version" in resp["error"]["message"]


def test_malformed_lines_after_hello_each_get_an_error(daemon: EmbeddedDaemon) -> None:
    resps = exchange(daemon.socket, HELLO, b"{nope\n", b'{"id": 2, "op": "frob"}\n',
                     b'{"id": 3, "op": "create", "args": {"name": 5}}\n',
                     b'{"id": 4, "op": "status", "args": {}}\n')
    assert resps[0]["ok"]
    assert [r["error"]["code"] for r in resps[1:4]] == ["protocol", "protocol", "bad-request"]
    assert resps[4]["ok"] and resps[4]["id"] == 4


def test_oversized_message_closes_only_that_connection(daemon: EmbeddedDaemon) -> None:
    resps = exchange(daemon.socket, HELLO, b"x" * (protocol.MAX_MESSAGE + 10))
    assert resps[-1]["error"]["code"] == "protocol"
    assert_alive(daemon)


def test_descriptors_without_a_request_are_closed_not_leaked(daemon: EmbeddedDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(daemon.socket))
        socket.send_fds(s, [HELLO], [0, 1, 2])
        s.recv(4096)
    assert_alive(daemon)


def test_exec_with_wrong_descriptor_count_is_a_bad_request(daemon: EmbeddedDaemon,
                                                           tmp_path: Path) -> None:
    with Client(daemon.socket) as client:
        client.call("workspace-add", path=str(tmp_path))
        client.call("create", workspace=str(tmp_path), name="fdcount")
        with pytest.raises(BranchError) as e:
            client.call("exec", [0, 1], workspace=str(tmp_path), name="fdcount", argv=["true"])
    assert e.value.code == "bad-request"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"") + b"\n"),
                max_size=5))
def test_fuzzed_lines_never_take_the_daemon_down(daemon: EmbeddedDaemon,
                                                 lines: list[bytes]) -> None:
    resps = exchange(daemon.socket, HELLO, *lines)
    assert resps[0]["ok"]
    for r in resps[1:]:
        assert r["ok"] or r["error"]["code"] in protocol.ERROR_EXIT
    assert_alive(daemon)


def test_exec_with_nul_in_the_environment_is_a_bad_request(daemon: EmbeddedDaemon,
                                                           tmp_path: Path) -> None:
    with Client(daemon.socket) as client:
        client.call("workspace-add", path=str(tmp_path))
        client.call("create", workspace=str(tmp_path), name="envnul")
        with pytest.raises(BranchError) as e:
            client.call("exec", workspace=str(tmp_path), name="envnul", argv=["true"],
                        env={"A": "x\0y"})
    assert e.value.code == "bad-request"
    assert_alive(daemon)
