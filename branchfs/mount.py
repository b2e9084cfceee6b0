"""serve(): mount the Store's branches with pyfuse3 and run the FUSE session."""

from __future__ import annotations

import logging
import os

import pyfuse3
import trio

from .fs import Operations
from .store import Store

log = logging.getLogger(__name__)


async def serve(store: Store, mountpoint: str, *, debug: bool = False,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount *store* at *mountpoint* and serve it until cancelled.

    One FUSE session per process (pyfuse3's rule). ``task_status.started()``
    is called once the mount is live; the mount is always removed on the way
    out, whatever ended the session.
    """
    ops = Operations(store)
    options = set(pyfuse3.default_options)
    options |= {"fsname=branchfs", "subtype=branchfs", "allow_other", "default_permissions"}
    if debug:
        options.add("debug")
    pyfuse3.init(ops, os.fspath(mountpoint), options)
    log.info("mounted branches at %s", mountpoint)
    try:
        ops.start()
        task_status.started()
        await pyfuse3.main()
    finally:
        ops.stop()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
