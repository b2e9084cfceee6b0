"""Verifiers: what the server's operator lets a verified completion run, read from a file.

A verifier names a workspace, the daemon that branches it, how a candidate is put
into a branch and the test command run there, with its limits. Requests only pick
a verifier by name: no request can say what runs (see README, "Verified completions").

    verifiers = load_verifiers(os.environ["BRANCHD_VERIFIERS"])   # TOML, or JSON by suffix

Every mistake in the file is a `VerifierConfigError` with a one-line message naming
the file, the verifier and the key.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cgroups import Limits

ENV_VAR = "BRANCHD_VERIFIERS"
APPLY = ("file", "git-apply")  # the candidate's text written to `file`, or a diff applied
CONTENT = ("text", "token_ids")  # what of a candidate is applied: its text, or its token ids
DEFAULT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_N = 8
MAX_N = 64  # no verifier may fork more branches per request
LIMIT_KEYS = ("memory", "cpus", "pids", "io_weight")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEYS = {"workspace", "socket", "apply", "file", "content", "test", "cwd", "timeout",
         "limits", "env", "max_n", "parallel"}


class VerifierConfigError(ValueError):
    """The verifiers file is unusable; the message is one line naming where."""


@dataclass(frozen=True)
class Verifier:
    """One verifier, validated: paths absolute or workspace-relative, limits parsed.

    Invariants: `test` is a non-empty argv; `file` is set iff `apply` is "file";
    `file` and `cwd` are relative paths without ".." (they stay in the branch);
    a "git-apply" verifier applies text (a diff has no token-id form)."""

    name: str
    workspace: Path
    socket: str
    test: tuple[str, ...]
    apply: str = "file"
    file: str | None = None
    content: str = "text"
    cwd: str = ""
    timeout: float = DEFAULT_TIMEOUT
    limits: Limits = Limits()
    env: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    max_n: int = DEFAULT_MAX_N
    parallel: int | None = None  # runs at once; None: all n

    def run_limits(self) -> Limits:
        """The limits of every run (apply and test), with the verifier's timeout."""
        return Limits.from_dict({**self.limits.to_dict(), "timeout": self.timeout})


def load_verifiers(path: str | os.PathLike[str]) -> dict[str, Verifier]:
    """Every verifier of the file at `path` (JSON if it ends in .json, else TOML)."""
    path = Path(path)
    where = f"verifiers file {path}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VerifierConfigError(f"{where}: cannot read it: {e.strerror}") from None
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VerifierConfigError(f"{where}: not valid {_kind(path)}: {first}") from None
    if not isinstance(data, dict) or set(data) != {"verifiers"}:
        raise VerifierConfigError(f"{where}: expected one table, 'verifiers', of named "
                                  "verifiers")
    table = data["verifiers"]
    if not isinstance(table, dict) or not table:
        raise VerifierConfigError(f"{where}: 'verifiers' names no verifier")
    return {name: parse_verifier(name, spec, where) for name, spec in table.items()}


def verifiers_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Verifier]:
    """The verifiers of the file `$BRANCHD_VERIFIERS` names; none when it is unset."""
    path = env.get(ENV_VAR)
    return load_verifiers(path) if path else {}


class VerifierFile:
    """A verifiers file as a server holds it: loaded again when it changes (its size,
    mtime or inode), so an operator edits verifiers without restarting the model.
    Thread-safe enough for one event loop: `current` is called from it alone."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self._verifiers: dict[str, Verifier] = {}
        self._error: str | None = None

    def current(self) -> dict[str, Verifier]:
        """The verifiers as the file says now; VerifierConfigError if it says nothing
        usable (the previous good version is not kept: the file is what counts)."""
        try:
            st = self.path.stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None  # load_verifiers says why
        if seen is None or seen != self._seen:
            self._seen = seen
            try:
                self._verifiers, self._error = load_verifiers(self.path), None
            except VerifierConfigError as e:
                self._verifiers, self._error = {}, str(e)
        if self._error is not None:
            raise VerifierConfigError(self._error)
        return self._verifiers


def parse_verifier(name: str, spec: Any, where: str = "verifier") -> Verifier:
    """One verifier's table, checked key by key."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VerifierConfigError(f"{where}: verifier name {name!r}: use 1-64 letters, "
                                  "digits, '_', '.' or '-'")
    at = f"{where}: verifier {name!r}"
    if not isinstance(spec, dict):
        raise VerifierConfigError(f"{at}: expected a table of settings")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise VerifierConfigError(f"{at}: unknown key(s) {', '.join(unknown)} (known: "
                                  f"{', '.join(sorted(_KEYS))})")

    def get(key: str, check: Callable[[Any], Any], default: Any = None,
            required: bool = False) -> Any:
        if key not in spec:
            if required:
                raise VerifierConfigError(f"{at}: {key} is required")
            return default
        try:
            return check(spec[key])
        except (TypeError, ValueError) as e:
            raise VerifierConfigError(f"{at}: {key}: {e}") from None

    workspace = get("workspace", _directory, required=True)
    socket = get("socket", _absolute, default=os.environ.get("BRANCHD_SOCKET"))
    if not socket:
        raise VerifierConfigError(f"{at}: socket is required (or $BRANCHD_SOCKET in the "
                                  "server's environment): the daemon that branches the "
                                  "workspace")
    apply = get("apply", _choice(APPLY), default="file")
    content = get("content", _choice(CONTENT), default="text")
    file = get("file", _inside)
    if apply == "file" and file is None:
        raise VerifierConfigError(f"{at}: file is required with apply = \"file\": where "
                                  "the candidate is written, relative to the workspace")
    if apply == "git-apply":
        if file is not None:
            raise VerifierConfigError(f"{at}: file is for apply = \"file\" only (a diff "
                                      "names its own files)")
        if content != "text":
            raise VerifierConfigError(f"{at}: apply = \"git-apply\" needs content = "
                                      "\"text\" (a diff is text)")
    max_n = get("max_n", _count(MAX_N), default=DEFAULT_MAX_N)
    return Verifier(
        name=name, workspace=workspace, socket=str(socket), test=get("test", _argv,
                                                                     required=True),
        apply=apply, file=file, content=content, cwd=get("cwd", _inside, default=""),
        timeout=get("timeout", _seconds, default=DEFAULT_TIMEOUT),
        limits=get("limits", _limits, default=Limits()),
        env=get("env", _env, default=dict(DEFAULT_ENV)),
        max_n=max_n, parallel=get("parallel", _count(MAX_N)),
    )


def _kind(path: Path) -> str:
    return "JSON" if path.suffix == ".json" else "TOML"


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise TypeError(f"expected a non-empty string, got {value!r}")
    return value


def _absolute(value: Any) -> str:
    text = _string(value)
    if not os.path.isabs(text):
        raise ValueError(f"{text!r} is not an absolute path")
    return text


def _directory(value: Any) -> Path:
    path = Path(_absolute(value))
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path


def _inside(value: Any) -> str:
    """A path relative to the workspace that cannot leave it ("" for its root)."""
    text = _string(value)
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{text!r} must be relative to the workspace, without '..'")
    return "" if str(path) == "." else str(path)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)
    return check


def _argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError("expected a non-empty list of strings (an argv, run without a shell)")
    return tuple(_string(a) for a in value)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < math.inf):
        raise ValueError(f"{value!r} is not a positive number of seconds")
    return float(value)


def _count(top: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{value!r} is not a whole number from 1 to {top}")
        return value
    return check


def _limits(value: Any) -> Limits:
    if not isinstance(value, dict):
        raise TypeError(f"expected a table of {', '.join(LIMIT_KEYS)}")
    extra = sorted(set(value) - set(LIMIT_KEYS))
    if extra:
        raise ValueError(f"unknown limit(s) {', '.join(extra)} (the run's timeout is "
                         "the verifier's timeout)" if "timeout" in extra else
                         f"unknown limit(s) {', '.join(extra)}")
    return Limits.from_dict(value)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError("expected a table of environment variables")
    for key, text in value.items():
        if not key or "=" in key or "\0" in key or not isinstance(text, str) or "\0" in text:
            raise ValueError(f"{key!r} = {text!r} is not an environment variable")
    return dict(value)
