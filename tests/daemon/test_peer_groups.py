"""A connection's supplementary groups are the client's as the kernel saw them at
connect() (SO_PEERGROUPS), never looked up later by pid.

A root daemon with ``--allow-uid 65534``; root's workspace is group 4242's (0770),
so uid 65534 may use it only with that group. The clients are stdlib socket
clients: the system's python3 under ``setpriv`` for uid 65534 with and without
the group, and a root process that connects as uid 65534 with the group, then
drops it (regaining root through its saved uid to do so) before it asks: the
daemon must still answer for the groups it connected with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from branching import Client, EmbeddedDaemon

from .conftest import passable_dir

pytestmark = [
    pytest.mark.mount, pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                       or not os.access("/usr/bin/python3", os.X_OK),
                       reason="needs root, setpriv and a system python uid 65534 may run"),
]

NOBODY = 65534
GROUP = 4242
# argv: socket, then "drop" to leave GROUP after connecting (run as root), else nothing
ASK = r"""
import json, os, socket, sys
if sys.argv[2] == "drop":
    os.setgroups([4242])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 0)  # the saved uid lets it take root back below
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rwb")
f.write(b'{"id":1,"op":"hello","args":{"version":1}}\n')
f.flush()
json.loads(f.readline())
if sys.argv[2] == "drop":
    os.seteuid(0)
    os.setgroups([])
    os.seteuid(65534)
    with open("/proc/self/status") as st:
        assert [l for l in st if l.startswith("Groups:")][0].split() == ["Groups:"]
f.write(b'{"id":2,"op":"list","args":{"workspace":"grpws"}}\n')
f.flush()
print(f.readline().decode().strip())
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[EmbeddedDaemon]:
    with passable_dir("branchd-groups-") as top:
        grpws = top / "grpws"
        grpws.mkdir()
        (grpws / "f").write_text("the group's\n")
        os.chown(grpws, 0, GROUP)
        grpws.chmod(0o770)
        (top / "daemon").mkdir(mode=0o755)
        d = EmbeddedDaemon(top / "daemon", args=["--allow-uid", str(NOBODY),
                                                 "--socket-mode", "0666"])
        try:
            d.start()
            with Client(d.socket) as c:
                c.call("workspace-add", path=str(grpws), name="grpws")
                c.call("create", name="g1", workspace="grpws")
            yield d
        finally:
            d.stop()


def ask(argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def as_nobody(daemon: EmbeddedDaemon, *groups: str) -> dict[str, Any]:
    gr = ["--groups", ",".join(groups)] if groups else ["--clear-groups"]
    return ask(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *gr,
                "/usr/bin/python3", "-I", "-c", ASK, str(daemon.socket), "-"])


def test_the_group_gives_access_and_its_absence_does_not(daemon: EmbeddedDaemon) -> None:
    got = as_nobody(daemon, "65533", str(GROUP))
    assert got["ok"], got
    assert [b["name"] for b in got["result"]["branches"]] == ["g1"]
    got = as_nobody(daemon, "65533")
    assert not got["ok"] and got["error"]["code"] == "permission", got
    got = as_nobody(daemon)
    assert not got["ok"] and got["error"]["code"] == "permission", got


def test_the_groups_are_those_at_connect_not_those_at_the_request(
        daemon: EmbeddedDaemon) -> None:
    got = ask([sys.executable, "-I", "-c", ASK, str(daemon.socket), "drop"])
    assert got["ok"], got  # /proc says no groups now: the daemon did not ask it
    assert [b["name"] for b in got["result"]["branches"]] == ["g1"]
