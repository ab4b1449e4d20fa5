"""Point the host's resolver at MagicDNS, reversibly.

Two ways, as the host is set up: with systemd-resolved managing /etc/resolv.conf, only the
mesh domain (and split-DNS domains) are routed to 100.100.100.100 on the tunnel interface
(`resolvectl`), which resolved forgets when the interface goes; otherwise /etc/resolv.conf
is backed up into the state directory and rewritten to name 100.100.100.100, and the backup
is written back on a clean stop and on `logout` (also after a crash: the backup stays until
then). The file is rewritten in place, not replaced: `ip netns exec` bind-mounts
/etc/netns/<ns>/resolv.conf over it, and a bind-mounted file cannot be renamed over.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Callable, Iterable

from .magic_dns import SERVICE_ADDRESS

log = logging.getLogger("raftmesh.agent.dns")
RESOLV_CONF = "/etc/resolv.conf"
BACKUP = "resolv.conf.pre-raftmesh"
MARK = "# written by the raftmesh agent (MagicDNS)"


def nameservers(text: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf, other than MagicDNS's own."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] != SERVICE_ADDRESS:
            found.append(parts[1])
    return found


def rendered(original: str, domain: str) -> str:
    """resolv.conf naming MagicDNS first, searching the mesh domain, keeping the original's
    other search domains and options."""
    search: list[str] = [domain]
    options = []
    for line in original.splitlines():
        parts = line.split()
        if parts and parts[0] in ("search", "domain"):
            search += [d for d in parts[1:] if d not in search]
        elif parts and parts[0] == "options":
            options.append(line)
    return "\n".join([MARK, f"nameserver {SERVICE_ADDRESS}", "search " + " ".join(search),
                      *options]) + "\n"


def _write_in_place(path: str, text: str) -> None:
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


class HostResolver:
    def __init__(self, state_dir: str, interface: str, path: str = RESOLV_CONF,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.path, self.interface, self._run = path, interface, run
        self.backup = os.path.join(state_dir, BACKUP)
        self.applied: tuple[str, tuple[str, ...]] | None = None

    def resolved_manages(self) -> bool:
        """systemd-resolved's stub is what resolv.conf points at (and resolvectl is there)."""
        target = os.path.realpath(self.path)
        return "/systemd/resolve/" in target and shutil.which("resolvectl") is not None

    def upstreams(self) -> list[str]:
        """The host's resolvers as they were before the agent changed anything."""
        for path in (self.backup, self.path):
            try:
                with open(path) as f:
                    return nameservers(f.read())
            except FileNotFoundError:
                continue
        return []

    def point_at_mesh(self, domain: str, split_domains: Iterable[str] = ()) -> None:
        want = (domain, tuple(sorted(split_domains)))
        if want == self.applied:
            return
        if self.resolved_manages():
            self._run(["resolvectl", "dns", self.interface, SERVICE_ADDRESS], check=True)
            self._run(["resolvectl", "domain", self.interface, domain,
                       *(f"~{d}" for d in want[1])], check=True)
        else:
            if not os.path.exists(self.backup):  # a backup left by a crash is the original
                shutil.copyfile(self.path, self.backup)
            with open(self.backup) as f:
                _write_in_place(self.path, rendered(f.read(), domain))
        self.applied = want
        log.info("host resolver points at MagicDNS for %s", domain)

    def restore(self) -> None:
        """Undo `point_at_mesh` (also one from an earlier run that did not stop cleanly)."""
        if self.applied is not None and self.resolved_manages():
            self._run(["resolvectl", "revert", self.interface], check=False)
        if os.path.exists(self.backup):
            with open(self.backup) as f:
                _write_in_place(self.path, f.read())
            os.unlink(self.backup)
            log.info("host resolver configuration restored")
        self.applied = None
