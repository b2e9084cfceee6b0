"""Exceptions of the cgroups package; each message is one line meant for the user."""


class CgroupError(Exception):
    """A cgroup operation failed (creation, a limit write, placement)."""


class SpawnError(CgroupError):
    """A candidate could not be started inside its cgroup; nothing of it is left running."""
