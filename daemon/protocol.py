"""The control protocol shared by branchd and its clients.

Newline-delimited JSON over a unix socket. Every message is one JSON object on
one line, at most MAX_MESSAGE bytes. A connection starts with ``hello``; the
daemon answers with its protocol version and refuses anything else first.

    request:  {"id": 7, "op": "create", "args": {...}}
    response: {"id": 7, "ok": true, "result": {...}}
              {"id": 7, "ok": false, "error": {"code": "not-found", "message": "..."}}

Error codes are stable strings; each maps to one documented exit code of
``branchctl``. This module is stdlib only: the client side (``branching``)
imports it and nothing else of the daemon.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes per line, either direction
MAX_DEPTH = 32  # nesting of arrays and objects in a message (meta is the deepest user)
MAX_DIGITS = 19  # of an integer: ids, counts and limits all fit in 63 bits

# Who may ask for an op: the daemon checks it once, before the op's handler runs
# (daemon.handlers.Handlers.authorize), against the object the request names.
ANYONE = "anyone"  # any peer the socket lets in
WORKSPACE = "workspace"  # the caller may use the workspace named (by path, name or one of
# its branches): the kernel gives them read, write and search on its base directory;
# a listing that names no workspace holds only those the caller may use
BRANCH = "branch"  # WORKSPACE, and the branch named is the caller's (they made it): others
# who may use the workspace may read it (info, diff), not change, run in or end it
RUN = "run"  # the caller started the run; nobody else's runs are shown to them
ADMIN = "admin"  # root or the daemon's own uid, who may also do everything above
PERMISSIONS = (ANYONE, WORKSPACE, BRANCH, RUN, ADMIN)


class Op(NamedTuple):
    permission: str
    required: tuple[str, ...]  # argument names; optional ones are documented in the daemon


OPS: dict[str, Op] = {
    "hello": Op(ANYONE, ("version",)),
    "status": Op(ANYONE, ()),  # counts only what the caller may see
    "workspace-add": Op(WORKSPACE, ("path",)),
    "workspace-list": Op(WORKSPACE, ()),
    "workspace-remove": Op(WORKSPACE, ("workspace",)),  # --force: theirs only to discard
    "create": Op(WORKSPACE, ("name",)),  # the workspace, or the parent branch's;
    # with "session": true the branch belongs to the connection's session (session-end)
    "list": Op(WORKSPACE, ()),
    "info": Op(WORKSPACE, ("name",)),
    "set-meta": Op(BRANCH, ("name", "meta")),
    "diff": Op(WORKSPACE, ("name",)),
    "commit": Op(BRANCH, ("name",)),  # and each change where the caller could write it
    "discard": Op(BRANCH, ("name",)),
    "rebase": Op(BRANCH, ("name",)),
    "resolve": Op(BRANCH, ("name", "path", "how")),
    "exec": Op(BRANCH, ("name", "argv")),
    "wait": Op(RUN, ("run",)),
    "kill": Op(RUN, ("run",)),
    "fsck": Op(ADMIN, ()),  # optional: repair (bool)
    "shutdown": Op(ADMIN, ()),
    # Ends the connection's session: its branches are the caller's to keep ("discard":
    # false) or discarded now (true). A connection that closes with a session still
    # open (its client died) has them discarded by the daemon. It touches nothing but
    # what this connection created, so anyone may ask.
    "session-end": Op(ANYONE, ()),
}


# Why a run ended: the ``ended_by`` of its result (``exec``/``wait``/``info`` replies),
# each with what ``branchctl exec`` says of it on stderr (None: it ended by itself).
# The first four come from cgroups (cgroups.run); the rest name who killed it.
ENDED_BY: dict[str, str | None] = {
    "exit": None,  # the command exited with a status
    "signal": None,  # it died of a signal branchd did not send (returncode 128+N)
    "timeout": "timed out after {timeout} and was killed",  # --timeout (exit 124)
    "oom": "killed by the kernel for memory (OOM)",  # at its --memory limit (137)
    "commit": "killed: its branch is being committed (also when that commit is then refused)",
    "discard": "killed: its branch was discarded",  # or its workspace removed --force
    "invalidated": "killed: a sibling's commit invalidated its branch",
    "kill": "killed on request",  # the kill op (as branchctl exec sends on Ctrl-C)
    "detached": "killed: the client it belonged to went away",
    "shutdown": "killed: the daemon is stopping",
}


def ended_by(result: dict[str, Any]) -> str:
    """A run result's ``ended_by``; from its flags where a daemon from before it sent none."""
    if why := result.get("ended_by"):
        return str(why)
    for flag, why in (("timed_out", "timeout"), ("oom_killed", "oom"), ("killed", "kill"),
                      ("signal", "signal")):
        if result.get(flag):
            return why
    return "exit"


def ended_message(run: str, result: dict[str, Any], timeout: float | None = None) -> str | None:
    """The line ``branchctl exec`` prints for a run that did not end by itself, else None."""
    why = ended_by(result)
    what = ENDED_BY.get(why, "killed ({ended_by})")
    if what is None:
        return None
    limit = f"{timeout:g}s" if timeout is not None else "its time limit"
    return f"branchctl: run {run} " + what.format(timeout=limit, ended_by=why)


def runtime_dir() -> Path:
    """Where the daemon keeps its socket (and, by default, its mountpoint)."""
    if env := os.environ.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/branchd")
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/branchd-{os.geteuid()}"
    return Path(xdg) / "branchd"


def default_socket() -> Path:
    """The socket both sides agree on: $BRANCHD_SOCKET, else the runtime directory's."""
    if env := os.environ.get("BRANCHD_SOCKET"):
        return Path(env)
    return runtime_dir() / "branchd.sock"


class ExitCode:
    """Exit codes of branchctl; the README's CLI reference lists them."""

    OK = 0
    FAILED = 1  # generic failure (a pattern committed nothing, a command failed)
    USAGE = 2  # bad arguments or bad name
    NOT_FOUND = 3  # unknown branch, workspace or run
    CONFLICT = 4  # exists, stale, racing commit, has children, outside change
    UNAVAILABLE = 5  # no daemon reachable, or it died mid-request
    NO_SPACE = 6  # ENOSPC while copying up or committing
    PERMISSION = 7  # peer or file permission refused
    PROTOCOL = 8  # malformed message or protocol version mismatch
    BASE_REPLACED = 9  # the branch's workspace directory was removed and made again
    INTERNAL = 70  # a bug: the daemon logged a traceback


# stable error code -> exit code
ERROR_EXIT: dict[str, int] = {
    "bad-request": ExitCode.USAGE,
    "bad-name": ExitCode.USAGE,
    "not-found": ExitCode.NOT_FOUND,
    "exists": ExitCode.CONFLICT,
    "conflict": ExitCode.CONFLICT,
    "stale": ExitCode.CONFLICT,
    "busy": ExitCode.CONFLICT,
    "unavailable": ExitCode.UNAVAILABLE,
    "no-space": ExitCode.NO_SPACE,
    "base-replaced": ExitCode.BASE_REPLACED,
    "permission": ExitCode.PERMISSION,
    "protocol": ExitCode.PROTOCOL,
    "internal": ExitCode.INTERNAL,
}


class ProtocolError(Exception):
    """A message that is not valid under this protocol."""

    code = "protocol"


class ValueRefused(ProtocolError):
    """Well-formed JSON carrying a value the protocol does not take (a huge integer)."""

    code = "bad-request"


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]

    def encode(self) -> bytes:
        return _line({"id": self.id, "op": self.op, "args": self.args})


@dataclass(frozen=True)
class Error:
    code: str
    message: str

    @property
    def exit_code(self) -> int:
        return ERROR_EXIT.get(self.code, ExitCode.INTERNAL)


@dataclass(frozen=True)
class Response:
    id: int
    result: dict[str, Any] | None = None
    error: Error | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        if self.error is None:
            return _line({"id": self.id, "ok": True, "result": self.result or {}})
        err = {"code": self.error.code, "message": self.error.message}
        return _line({"id": self.id, "ok": False, "error": err})


def _line(obj: dict[str, Any]) -> bytes:
    try:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    except RecursionError:
        raise ProtocolError("message nests too deeply to encode") from None
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise ValueRefused(f"integer of {len(digits)} digits: at most {MAX_DIGITS} are allowed")
    return int(digits)


def _constant(name: str) -> float:
    raise ProtocolError(f"not JSON: {name}")


def _depth(obj: Any) -> int:
    """How deeply arrays and objects nest in *obj* (iterative: no recursion limit)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            todo.extend((c, depth + 1) for c in (item.values() if isinstance(item, dict) else item))
    return deepest


def _object(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(line)} bytes exceeds {MAX_MESSAGE}")
    too_deep = ProtocolError(f"message nests deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(line, parse_int=_int, parse_constant=_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise too_deep from None
    if _depth(obj) > MAX_DEPTH:
        raise too_deep
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    ident = obj.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool):
        raise ProtocolError("message has no integer 'id'")
    return obj


def decode_request(line: bytes) -> Request:
    obj = _object(line)
    op, args = obj.get("op"), obj.get("args", {})
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    if not isinstance(args, dict):
        raise ProtocolError("'args' is not an object")
    missing = [a for a in OPS[op].required if a not in args]
    if missing:
        raise ProtocolError(f"op {op!r} is missing {', '.join(missing)}")
    return Request(obj["id"], op, args)


def decode_response(line: bytes) -> Response:
    obj = _object(line)
    if obj.get("ok") is True:
        result = obj.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError("'result' is not an object")
        return Response(obj["id"], result=result)
    err = obj.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        raise ProtocolError("error response without an error code")
    return Response(obj["id"], error=Error(err["code"], str(err.get("message", ""))))
