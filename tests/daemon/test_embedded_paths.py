"""An embedded daemon under a directory too deep for a unix socket's path."""

from __future__ import annotations

from pathlib import Path

from branching import Workspace
from branching.embedded import SUN_PATH_MAX, EmbeddedDaemon


def test_deep_root_puts_the_sockets_elsewhere(tmp_path: Path) -> None:
    root = tmp_path / ("d" * 60) / ("e" * 60)
    root.mkdir(parents=True)
    assert len(str(root / "branchd.sock")) >= SUN_PATH_MAX  # would not bind there
    base = tmp_path / "proj"
    base.mkdir()
    (base / "a").write_text("x")
    d = EmbeddedDaemon(root)
    sockets = d.socket.parent
    try:
        d.start()
        assert len(str(d.socket)) < SUN_PATH_MAX
        with Workspace(base, daemon=d.socket) as ws:
            assert (ws.create("b").path / "a").read_text() == "x"
    finally:
        d.stop()
    assert not sockets.exists()  # the short directory goes with the daemon
