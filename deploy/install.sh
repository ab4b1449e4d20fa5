#!/usr/bin/env bash
# Installs raftmesh on a Debian machine (run as root), editable from this checkout, into a
# virtualenv at $RAFTMESH_VENV (/opt/raftmesh), with `raftmesh` linked as $RAFTMESH_LINK
# (/usr/local/bin/raftmesh; empty: no link). Debian packages are installed only when missing.
#
#   bash deploy/install.sh            what a replica, an agent and the CLI need: wireguard-go,
#                                     wireguard-tools, nftables (and its Python binding),
#                                     iproute2 and raftmesh itself
#   bash deploy/install.sh --bench    also the benchmarks' extra (plots), etcd-server (the
#                                     side-by-side write benchmark starts its own members) and
#                                     iperf3 (bench throughput; it comes with a service)
#   bash deploy/install.sh --tests    also the test extra, which includes the benchmarks' (the
#                                     tests run every benchmark at a tiny size), etcd-server,
#                                     iperf3, haproxy (tests/test_haproxy.py), fuse3 (power cuts),
#                                     prometheus (promtool checks deploy/monitoring), chromium
#                                     and chromium-driver (the console's browser tests) and npm's
#                                     axe-core into $RAFTMESH_VENV/node (their accessibility check)
#   --dry-run                         prints what it would do, changes nothing
#
# HAProxy belongs on the load-balancer machines of a deployment (docs/deployment.md installs
# it there), not on replicas, so only the tests bring it here.
#
# No service is started, stopped or disabled: packages that come with one (etcd-server,
# haproxy) are installed with a temporary /usr/sbin/policy-rc.d that forbids starting
# services (exit 101, Debian's invoke-rc.d policy interface), removed afterwards; an existing
# policy-rc.d is left as it is and stays in charge.
#
# The virtualenv is built on Debian's own python3 when it is 3.11 or newer: Debian builds it
# with profile-guided and link-time optimisation, into the executable; an interpreter built
# without them (pyenv's default) spent 21% more CPU per replicated write here (docs/benchmarks.md).
set -euo pipefail

policy_rc_d=/usr/sbin/policy-rc.d
nft_binding=/usr/lib/python3/dist-packages/nftables
dry_run=false

usage() {  # the comment above; to stdout for --help (exit 0), else to stderr (exit 2)
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&"$(( $1 == 0 ? 1 : 2 ))"
  exit "$1"
}

run() {  # a command that changes the machine; only shown with --dry-run
  if $dry_run; then echo "would run: $*"; else "$@"; fi
}

missing_packages() {  # package:binary (or package:/path) pairs -> the packages not installed
  local pkg_bin pkg bin
  for pkg_bin in "$@"; do
    pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
    if [ "${bin#/}" != "$bin" ]; then [ -e "$bin" ] || echo "$pkg"; continue; fi
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || echo "$pkg"
  done
}

apt_install() {
  echo "installing Debian packages: $*"
  if $dry_run; then echo "would run: apt-get update; apt-get install $*"; return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

apt_install_without_starting_services() {
  if [ -e "$policy_rc_d" ]; then  # someone else's policy: theirs to decide
    echo "$policy_rc_d exists: it decides whether services of $* start"
    apt_install "$@"
    return
  fi
  echo "$policy_rc_d (exit 101) for this install: no service of $* starts"
  if ! $dry_run; then
    printf '#!/bin/sh\n# raftmesh deploy/install.sh: no service starts during its install\nexit 101\n' \
      >"$policy_rc_d"
    chmod 0755 "$policy_rc_d"
    trap 'rm -f "$policy_rc_d"' EXIT  # also when the install fails
  fi
  apt_install "$@"
  run rm -f "$policy_rc_d"
  trap - EXIT
}

main() {
  local extra="" pkgs=(wireguard-go:wireguard-go wireguard-tools:wg nftables:nft iproute2:ip
                       python3-nftables:$nft_binding)
  local with_services=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --tests) extra="[test]"; with_services=(etcd-server:etcd haproxy:haproxy iperf3:iperf3
                                              prometheus:promtool)
               pkgs+=(fuse3:fusermount3  # power cuts serve replicas' disks over FUSE (lab/lazy_fs.py)
                      chromium:chromium chromium-driver:chromedriver npm:npm) ;;  # tests/test_console_browser.py
      --bench) [ "$extra" = "[test]" ] || extra="[bench]"
               [ ${#with_services[@]} -gt 0 ] || with_services=(etcd-server:etcd iperf3:iperf3) ;;
      --dry-run) dry_run=true ;;
      -h|--help) usage 0 ;;
      *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
    shift
  done
  cd "$(dirname "${BASH_SOURCE[0]}")/.."

  local need
  mapfile -t need < <(missing_packages "${pkgs[@]}")
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
  if [ ${#with_services[@]} -gt 0 ]; then
    mapfile -t need < <(missing_packages "${with_services[@]}")
    [ ${#need[@]} -eq 0 ] || apt_install_without_starting_services "${need[@]}"
  fi

  local venv=${RAFTMESH_VENV:-/opt/raftmesh} link=${RAFTMESH_LINK-/usr/local/bin/raftmesh}
  local python=python3
  /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && python=/usr/bin/python3
  if $dry_run; then
    [ -x "$venv/bin/python" ] || echo "would run: $python -m venv $venv (apt-get install python3-venv first if that fails)"
  elif [ ! -x "$venv/bin/python" ] && ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv  # Debian's python3 makes venvs with it only
    "$python" -m venv "$venv"
  fi
  run "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".$extra"
  # nftables' own Python binding (libnftables through ctypes; Debian ships it, PyPI does not),
  # and only it, into the virtualenv: the agent loads its packet filter without starting nft
  if [ -d "$nft_binding" ] || $dry_run; then
    local site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) \
      || site="$venv/lib/python3/site-packages"
    run ln -sfn "$nft_binding" "$site/nftables"
  fi
  # axe-core (the console tests inject it into the browser) from npm, into the virtualenv
  [ "$extra" != "[test]" ] || run npm install --silent --no-save --prefix "$venv/node" axe-core@4
  [ -z "$link" ] || run ln -sf "$venv/bin/raftmesh" "$link"
}

# Sourced (tests/test_install.py), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
