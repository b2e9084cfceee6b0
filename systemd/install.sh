#!/usr/bin/env bash
# Install branchd as a systemd service from this checkout (run as root):
#   sudo bash systemd/install.sh
# Sets up the checkout's virtualenv (bootstrap.sh), links its branchd and
# branchctl into /usr/local/bin, installs the unit and starts it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 7; }
bash "$here/bootstrap.sh" setup
ln -sf "$here/.venv/bin/branchd" /usr/local/bin/branchd
ln -sf "$here/.venv/bin/branchctl" /usr/local/bin/branchctl
install -m 0644 "$here/systemd/branchd.service" /etc/systemd/system/branchd.service
systemctl daemon-reload
systemctl enable --now branchd.service
systemctl --no-pager status branchd.service
