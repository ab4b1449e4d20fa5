#!/usr/bin/env bash
# Installs what raftmesh needs on a fresh Debian machine (run as root): the Debian parts
# (WireGuard userspace, nftables, iproute2, HAProxy; etcd for the side-by-side benchmark)
# when missing, then raftmesh itself with its test extras, editable from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg_bin in wireguard-go:wireguard-go wireguard-tools:wg nftables:nft iproute2:ip haproxy:haproxy etcd-server:etcd; do
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
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
