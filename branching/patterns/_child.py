"""The child side of a Python-callable candidate.

Invoked as ``python .../branching/patterns/_child.py CALL RESULT``: stdlib only,
so that a candidate's start costs only what its callable imports.

Runs in the branch (cwd), inside the daemon's cgroup-limited child process.
Loads the pickled callable written by ``candidate.Call``, calls it with the
branch's path and writes what happened to RESULT.  Exit status: 0 when the
candidate succeeded, 1 when it failed or raised (the traceback also goes to
stderr, i.e. the candidate's log).  A crash or an OOM kill leaves no RESULT:
the parent reads that from the run's exit status.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any


def _install_main(main_file: str | None) -> None:
    """Make ``__main__`` resolve to the caller's script, so its functions unpickle.

    Like multiprocessing's spawn start method, the script is imported under
    another name (``__mp_main__``): its ``if __name__ == "__main__"`` block
    does not run again.
    """
    if not main_file or not os.path.exists(main_file):
        return
    spec = importlib.util.spec_from_file_location("__mp_main__", main_file)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = module
    spec.loader.exec_module(module)
    sys.modules["__main__"] = module


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
        _install_main(payload["main_file"])
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
