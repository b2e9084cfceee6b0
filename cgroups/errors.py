"""Exceptions of the cgroups package; each message is one line meant for the user."""


class CgroupError(Exception):
    """A cgroup operation failed (creation, a limit write, placement)."""


class SpawnError(CgroupError):
    """A candidate could not be started inside its cgroup; nothing of it is left running.

    ``errno`` is the error of the step that failed, where it was a system call
    (entering the cwd, the bind), else None."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
