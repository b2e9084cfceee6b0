"""sd_notify messages, received on a socket the test listens on (systemd is not PID 1 here)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from daemon.notify import Notifier


def test_ready_and_status_reach_the_listener(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        n = Notifier(str(path))
        n.ready("2 workspaces")
        n.status("busy")
        n.stopping()
        messages = [listener.recv(4096).decode() for _ in range(3)]
    ready = dict(line.split("=", 1) for line in messages[0].splitlines())
    assert ready == {"READY": "1", "STATUS": "2 workspaces", "MAINPID": str(os.getpid())}
    assert messages[1] == "STATUS=busy"
    assert "STOPPING=1" in messages[2].splitlines()


def test_abstract_socket_address() -> None:
    name = f"branchd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        Notifier("@" + name).status("ok")
        assert listener.recv(100) == b"STATUS=ok"


def test_without_notify_socket_nothing_is_sent(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    Notifier().ready("fine")  # no listener, no error: a no-op by design


def test_vanished_listener_is_logged_once_not_raised(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="daemon.notify")  # gone: normal, so INFO
    n = Notifier(str(tmp_path / "gone"))
    n.status("x")
    n.status("y")
    assert caplog.text.count("sd_notify") == 1
