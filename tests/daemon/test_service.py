"""The daemon's life as a service: readiness, signals, logs, clean stop."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.main import JournalFormatter, setup_logging

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_for_log(d: EmbeddedDaemon, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log_path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the daemon's log:\n{log}")


def test_ready_means_mounted_and_listening_and_sigterm_unmounts(tmp_path: Path) -> None:
    d = EmbeddedDaemon(tmp_path).start()
    try:
        assert mounted(d.mountpoint)
        assert d.socket.is_socket()
        assert d.proc is not None
        proc = d.proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not mounted(d.mountpoint) and not d.socket.exists()
    finally:
        d.stop()


def test_sigusr1_dumps_stacks_and_sighup_toggles_debug(tmp_path: Path) -> None:
    d = EmbeddedDaemon(tmp_path).start()
    try:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGUSR1)
        wait_for_log(d, "most recent call first")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for_log(d, "log level now DEBUG")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for_log(d, "log level now INFO")
    finally:
        d.stop()


def test_journald_priority_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    record = logging.LogRecord("daemon.x", logging.WARNING, __file__, 1, "disk %s", ("full",),
                               None)
    assert JournalFormatter("%(message)s").format(record) == "<4>disk full"
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("info")
        assert isinstance(root.handlers[0].formatter, JournalFormatter)
        monkeypatch.delenv("JOURNAL_STREAM")
        setup_logging("info")
        assert not isinstance(root.handlers[0].formatter, JournalFormatter)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
