"""The Store's record log: creates and discards append to state.log.<n> instead
of rewriting state.json; a snapshot starts a new log; old ended records go."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from branchfs import NotFound, Store
from branchfs import store as store_mod
from branchfs.errors import Corrupt

REPO = Path(__file__).parent.parent.parent

# Opens a store, makes branches and dies by SIGKILL without closing it: what the
# log holds is all the next open can know.
KILLED = """
import os, signal, sys
from branchfs import Store
s = Store(sys.argv[1])
s.create_branch("ws", "kept")
s.create_branch("ws", "gone")
s.discard("ws", "gone")
os.kill(os.getpid(), signal.SIGKILL)
"""


def logs(state: Path) -> list[str]:
    return sorted(n for n in os.listdir(state) if n.startswith(store_mod.LOG_PREFIX))


def test_creates_reach_the_log_not_the_snapshot(tmp_path: Path, store: Store) -> None:
    state = tmp_path / "state"
    snapshot = (state / "state.json").read_bytes()
    store.create_branch("ws", "a")
    store.discard("ws", "a")
    assert (state / "state.json").read_bytes() == snapshot
    [name] = logs(state)
    lines = (state / name).read_bytes().splitlines()
    assert [json.loads(x)["set"]["status"] for x in lines] == ["active", "discarded"]


def test_records_survive_sigkill(tmp_path: Path, store: Store) -> None:
    store.close()
    state = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(state)],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    s2 = Store(state)
    try:
        assert {(b.name, b.status) for b in s2.branches(include_ended=True)} == {
            ("kept", "active"), ("gone", "discarded")}
        assert (Path(s2.delta_dir("ws", "kept"))).is_dir()
    finally:
        s2.close()


def test_torn_last_line_is_ignored(tmp_path: Path, store: Store) -> None:
    store.create_branch("ws", "a")
    store.close()
    state = tmp_path / "state"
    [name] = logs(state)
    with open(state / name, "ab") as f:
        f.write(b'{"set": {"id": "00')  # a crash in the middle of an append
    s2 = Store(state)
    try:
        assert [b.name for b in s2.branches()] == ["a"]
    finally:
        s2.close()


def test_a_long_log_becomes_a_snapshot(tmp_path: Path, store: Store,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "LOG_MAX", 5)
    state = tmp_path / "state"
    before = logs(state)
    for i in range(8):
        store.create_branch("ws", f"b{i}")
    assert logs(state) != before  # compacted: a new generation
    [name] = logs(state)
    assert json.loads((state / "state.json").read_text())["log"] == int(name.rsplit(".", 1)[1])
    store.close()
    s2 = Store(state)
    try:
        assert sorted(b.name for b in s2.branches()) == [f"b{i}" for i in range(8)]
    finally:
        s2.close()


def test_old_ended_records_are_forgotten(tmp_path: Path, store: Store,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "ENDED_KEPT", 2)
    for i in range(4):
        store.create_branch("ws", f"e{i}")
        store.discard("ws", f"e{i}")
    store.create_branch("ws", "live")
    store.commit("ws", "live")
    store.close()
    s2 = Store(tmp_path / "state")  # opening takes a snapshot, which prunes
    try:
        assert [b.name for b in s2.branches(include_ended=True)] == ["e3", "live"]
    finally:
        s2.close()


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path: Path, store: Store) -> None:
    store.create_branch("ws", "a")
    store.create_branch("ws", "b")
    store.close()
    state = tmp_path / "state"
    [name] = logs(state)
    lines = (state / name).read_bytes().split(b"\n")
    lines[0] = b'{"set": {"id": garbage'
    (state / name).write_bytes(b"\n".join(lines))
    with pytest.raises(Corrupt, match=f"{name}: line 1 of 2 is not a record"):
        Store(state)


def test_a_corrupt_origins_record_is_an_error(tmp_path: Path, store: Store) -> None:
    store.create_branch("ws", "a")
    path = Path(store.delta_dir("ws", "a")).parent / "origins"
    store.close()
    with open(path, "ab") as f:
        f.write(b"[not json\n[\"x\"]\n")
    with pytest.raises(Corrupt, match="line 2 of 3 is not a record"):
        Store(tmp_path / "state").view("ws", "a")


def test_a_missing_delta_ends_its_branches_and_the_store_opens(tmp_path: Path,
                                                                store: Store) -> None:
    store.create_branch("ws", "a")
    store.create_branch("ws", "kid", parent="a")
    store.create_branch("ws", "other")
    gone = Path(store.delta_dir("ws", "a")).parent
    store.close()
    shutil.rmtree(gone)
    s2 = Store(tmp_path / "state")
    try:
        status = {b.name: b.status for b in s2.branches(include_ended=True)}
        assert status == {"a": "discarded", "kid": "discarded", "other": "active"}
        assert len(s2.recovered) == 2 and "delta directory it needs was missing" in s2.recovered[0]
        with pytest.raises(NotFound, match="was discarded at start-up"):
            s2.view("ws", "kid")
    finally:
        s2.close()
