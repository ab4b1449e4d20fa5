"""The agent's state directory: keys and the last verified netmap, all mode 0600.

Files are replaced atomically (write, fsync, rename, fsync dir), so a crash or power loss
leaves either the old or the new netmap, never a torn one: after a restart during a full
control-plane outage the agent brings its tunnels back from this cache.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from raftmesh.storage.durable_files import write_file_durably


class StateDir:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read_json(self, name: str) -> Any:
        try:
            with open(self._file(name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, value: Any, durable: bool = True) -> None:
        """`durable=False` for what is rewritten while running and means nothing after a
        crash (status.json): atomic, without the two fsyncs (a few ms each on a busy disk,
        on the path from a netmap to the first packet)."""
        write_file_durably(self._file(name), json.dumps(value, sort_keys=True).encode(),
                           durable=durable)

    def _key(self, name: str, make) -> bytes:
        path = self._file(name)
        try:
            with open(path, "rb") as f:
                return base64.b64decode(f.read())
        except FileNotFoundError:
            raw = make()
            write_file_durably(path, base64.b64encode(raw))
            return raw

    def machine_key(self) -> SigningKey:
        """Ed25519 identity of this machine; proves every request to the control plane."""
        return SigningKey(self._key("machine.key", lambda: bytes(SigningKey.generate())))

    def wireguard_key(self) -> PrivateKey:
        """X25519 WireGuard private key; its public half is the node key peers see."""
        return PrivateKey(self._key("wireguard.key", lambda: bytes(PrivateKey.generate())))

    def replace_wireguard_key(self) -> PrivateKey:
        key = PrivateKey.generate()
        write_file_durably(self._file("wireguard.key.next"), base64.b64encode(bytes(key)))
        return key

    def commit_wireguard_key(self) -> None:
        os.replace(self._file("wireguard.key.next"), self._file("wireguard.key"))
