"""The library's one exception type: a refused or failed request, with its stable code."""

from __future__ import annotations

from daemon.protocol import ERROR_EXIT, ExitCode


class BranchError(Exception):
    """A daemon error (``code`` is the protocol's stable code) or an unreachable daemon."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def exit_code(self) -> int:
        return ERROR_EXIT.get(self.code, ExitCode.INTERNAL)
