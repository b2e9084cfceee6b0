"""A diff of any size: fetched in pages that each fit in one message.

A branch holding a virtualenv changes thousands of paths; one reply listing
them all exceeded the protocol's 1 MiB per message (exit 8).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import diffpage

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]

FILES = 9000  # with these path lengths, about 1.4 MB of change records
SITE = ".venv/lib/python3.11/site-packages"
MAKE = f"""
import os
for p in range({FILES} // 100):
    d = "{SITE}/package_with_a_long_enough_name_{{:03}}".format(p)
    os.makedirs(d)
    for m in range(100):
        open(f"{{d}}/module_number_{{m:03}}.py", "w").write("x = 1\\n")
"""


def test_a_venv_sized_diff_comes_whole_in_pages(cli: CLI, ws: Path) -> None:
    p = Path(cli("create", "venv", "-w", str(ws)).stdout.strip())
    cli("exec", "venv", "--", "python3", "-c", MAKE)
    (p / "README").write_text("changed\n")
    d = cli.json("diff", "venv")
    # the files, their 90 directories, the 4 above them, README
    assert d["total"] == len(d["changes"]) == FILES + FILES // 100 + 4 + 1
    assert d["stat"] == {"added": d["total"] - 1, "modified": 1, "deleted": 0}
    assert len(json.dumps(d["changes"])) > 1 << 20  # more than one message holds
    assert cli.json("diff", "venv", "--stat")["stat"] == d["stat"]
    one = cli.json("diff", "venv", f"{SITE}/package_with_a_long_enough_name_007")
    assert one["total"] == 101 and all("_007" in c["path"] for c in one["changes"])
    assert [c["path"] for c in cli.json("diff", "venv", "README")["changes"]] == ["README"]
    cli("discard", "venv")


def test_a_patch_too_big_for_one_reply_says_what_it_left_out(cli: CLI, ws: Path) -> None:
    p = Path(cli("create", "big", "-w", str(ws)).stdout.strip())
    body = "".join(f"line {i} of a text file that is long enough\n" for i in range(100))
    for i in range(300):
        (p / f"t{i:03}.txt").write_text(body)
    d = cli.json("diff", "big", "--patch")
    assert len(d["changes"]) == 300
    assert len(d["patch"]) < 2 * diffpage.PATCH_BYTES
    assert "more files not shown, from t" in d["patch"]
    whole = cli.json("diff", "big", "--patch", "t299.txt")["patch"]
    assert whole.count("\n+line ") == 100 and "not shown" not in whole
    cli("discard", "big")
