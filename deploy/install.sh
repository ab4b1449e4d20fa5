#!/usr/bin/env bash
# Installs what raftmesh needs on a fresh Debian machine (run as root): the Debian parts
# (WireGuard userspace, nftables, iproute2, HAProxy; etcd for the side-by-side benchmark)
# when missing, then raftmesh itself with its test extras, editable from this checkout, into
# a virtualenv at $RAFTMESH_VENV (/opt/raftmesh) with `raftmesh` linked into /usr/local/bin.
#
# The virtualenv is built on Debian's own python3 when it is 3.11 or newer: Debian builds it
# with profile-guided and link-time optimisation, into the executable; an interpreter built
# without them (pyenv's default) spent 21% more CPU per replicated write here (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
packages="wireguard-go:wireguard-go wireguard-tools:wg nftables:nft iproute2:ip haproxy:haproxy etcd-server:etcd"
# Tests only: power cuts (lab/lazy_fs.py, chaos `powercut`) serve replicas' disks over FUSE.
packages+=" fuse3:fusermount3"
for pkg_bin in $packages; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The etcd package starts a system etcd; benchmarks start their own members.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi
  pkill -x etcd >/dev/null 2>&1 || true
fi
venv=${RAFTMESH_VENV:-/opt/raftmesh}
python=python3
/usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && python=/usr/bin/python3
if [ ! -x "$venv/bin/python" ] && ! "$python" -m venv "$venv" >/dev/null 2>&1; then
  echo "installing Debian packages: python3-venv"  # Debian's python3 makes venvs with it only
  rm -rf "$venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
ln -sf "$venv/bin/raftmesh" /usr/local/bin/raftmesh
