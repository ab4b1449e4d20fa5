"""Nebula (Debian's `nebula`, slackhq/nebula) on the same namespace lab, for `bench connect`'s
side-by-side: one lighthouse on the public side that is also the relay, hosts with
`punchy` (hole punching) and `use_relays`, certificates from `nebula-cert`."""
from __future__ import annotations

import os
import shutil
import subprocess

from raftmesh.lab.processes import run

PORT = 4242
LIGHTHOUSE_IP = "10.99.0.1"


def available() -> bool:
    return bool(shutil.which("nebula") and shutil.which("nebula-cert"))


class NebulaNet:
    """A CA in `workdir`, and configs for a lighthouse and hosts (overlay 10.99.0.0/16)."""

    def __init__(self, workdir: str, lighthouse_public: str):
        self.dir = os.path.join(workdir, "nebula")
        os.makedirs(self.dir, exist_ok=True)
        self.lighthouse_public = lighthouse_public
        run(["nebula-cert", "ca", "-name", "raftmesh-bench", "-out-crt", self._p("ca.crt"),
             "-out-key", self._p("ca.key")])
        self._next = 2

    def _p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def host(self, name: str, lighthouse: bool = False) -> tuple[str, str]:
        """(config path, overlay IP) of a new host."""
        ip = LIGHTHOUSE_IP if lighthouse else f"10.99.{self._next // 250}.{self._next % 250 + 1}"
        self._next += 0 if lighthouse else 1
        run(["nebula-cert", "sign", "-name", name, "-ip", f"{ip}/16", "-ca-crt", self._p("ca.crt"),
             "-ca-key", self._p("ca.key"), "-out-crt", self._p(f"{name}.crt"),
             "-out-key", self._p(f"{name}.key")])
        config = self._p(f"{name}.yml")
        with open(config, "w") as f:
            f.write(self._config(name, lighthouse))
        return config, ip

    def _config(self, name: str, lighthouse: bool) -> str:
        hosts = "[]" if lighthouse else f'["{LIGHTHOUSE_IP}"]'
        relays = "[]" if lighthouse else f'["{LIGHTHOUSE_IP}"]'
        return f"""pki:
  ca: {self._p("ca.crt")}
  cert: {self._p(name + ".crt")}
  key: {self._p(name + ".key")}
static_host_map:
  "{LIGHTHOUSE_IP}": ["{self.lighthouse_public}:{PORT}"]
lighthouse:
  am_lighthouse: {str(lighthouse).lower()}
  interval: 60
  hosts: {hosts}
listen:
  host: 0.0.0.0
  port: {PORT}
punchy:
  punch: true
  respond: true
relay:
  am_relay: {str(lighthouse).lower()}
  use_relays: true
  relays: {relays}
tun:
  dev: nebula1
  mtu: 1300
logging:
  level: warning
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
"""

    @staticmethod
    def start(ns, config: str, log_path: str) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return ns.spawn("nebula", "-config", config, stdout=log, stderr=subprocess.STDOUT)
