"""sd_notify: tell the service manager (or the embedded launcher) about readiness.

The protocol is one datagram of newline-separated KEY=VALUE lines to the unix
socket named by $NOTIFY_SOCKET ("@" prefix: abstract namespace). Without that
variable every call is a no-op, so the daemon runs the same everywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; silent when not run under a notify-aware parent."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]

    def send(self, **fields: str | int) -> None:
        if not self.address:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(message, self.address)
            except OSError as e:
                # A vanished listener must not take the daemon down, nor fill its log:
                # say it once, then stop. One that is gone (no socket, nobody bound) is
                # the embedded launcher, which stops listening after READY: normal, so
                # not a warning; anything else (a full queue, a refused peer) is one.
                gone = e.errno in (errno.ENOENT, errno.ECONNREFUSED)
                log.log(logging.INFO if gone else logging.WARNING,
                        "sd_notify to %r failed: %s; no more notifications", self.address, e)
                self.address = None

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> None:
        self.send(status=status)

    def stopping(self) -> None:
        self.send(stopping=1, status="stopping")
