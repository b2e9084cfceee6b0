"""The child side of a Python-callable candidate.

Invoked as ``python .../branching/patterns/_child.py CALL RESULT``: stdlib only,
so that a candidate's start costs only what its callable imports.

Runs in the branch (cwd), inside the daemon's cgroup-limited child process.
Loads the callable ``candidate.Call`` pickled with cloudpickle (plain pickle
reads it, with cloudpickle importable from the caller's sys.path), calls it
with the path the run sees its branch at (the workspace's, by default) and
writes what happened to RESULT.  Exit status: 0 when the candidate succeeded,
1 when it failed or raised (the traceback also goes to stderr, i.e. the
candidate's log).  A crash or an OOM kill leaves no RESULT:
the parent reads that from the run's exit status.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any


def _outcome(value: Any) -> tuple[bool, float | None]:
    if value is None or value is True:
        return True, None
    if value is False:
        return False, None
    if isinstance(value, int | float):
        return True, float(value)
    return True, None


def main(argv: list[str]) -> int:
    call_path, result_path = argv
    with open(call_path, "rb") as f:
        payload = pickle.load(f)
    sys.path[:0] = [p for p in payload["sys_path"] if p not in sys.path]
    result: dict[str, Any] = {"ok": False, "score": None, "exc": None, "error": None}
    try:
        fn = pickle.loads(payload["fn"])
        result["ok"], result["score"] = _outcome(fn(Path(os.getcwd())))
    except Exception as e:
        text = traceback.format_exc()
        sys.stderr.write(text)
        result["error"] = text
        try:
            result["exc"] = pickle.dumps(e)
        except Exception:  # an exception that does not pickle comes back as its text
            result["exc"] = None
    sys.stdout.flush()
    sys.stderr.flush()
    with open(result_path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(result_path + ".tmp", result_path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    del sys.path[0]  # this file's directory: its modules must not shadow the candidate's
    sys.exit(main(sys.argv[1:]))
