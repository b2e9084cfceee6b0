"""branchd: the daemon that owns the FUSE mount, the control socket and the state."""
