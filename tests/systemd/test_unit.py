"""The systemd unit: verified by systemd itself, and free of mount-namespacing options."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "systemd" / "branchd.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    # verify resolves ExecStart: point it at an executable that exists here.
    venv_bin = os.path.dirname(sys.executable)
    branchd = shutil.which("branchd") or shutil.which("branchd", path=venv_bin)
    assert branchd, "the branchd console script must be installed"
    unit = tmp_path / "branchd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/branchd", branchd))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    warnings = [line for line in proc.stderr.splitlines() if "branchd.service" in line]
    assert proc.returncode == 0 and warnings == [], proc.stderr


def test_unit_has_the_service_contract() -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    svc = cp["Service"]
    assert svc["Type"] == "notify"
    assert svc["Delegate"] == "yes"
    assert svc["KillMode"] == "mixed"
    assert int(svc["TimeoutStopSec"]) >= 60
    assert svc["RuntimeDirectory"] == svc["StateDirectory"] == "branchd"
    # one descriptor per connection: systemd's soft default of 1024 let clients exhaust it
    assert int(svc["LimitNOFILE"]) >= 65536
    namespacing = {"PrivateTmp", "PrivateDevices", "ProtectSystem", "ProtectHome",
                   "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
                   "PrivateMounts", "MountFlags"}
    assert namespacing.isdisjoint(svc.keys())
