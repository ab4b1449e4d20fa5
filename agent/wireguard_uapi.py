"""wireguard-go's control socket (the cross-platform UAPI, wireguard.com/xplatform), spoken
directly instead of through `wg`.

Every `wg` call from an agent in a network namespace is two process starts (`ip netns exec`,
then `wg`): 15-20 ms each on a busy 2-core host, and a netmap apply made four of them. A
request on the socket takes about a millisecond. The format is line-based `key=value`:
`get=1` answers the device and its peers, `set=1` applies changes; both end with a blank
line, and the answer's last line is `errno=N`. Keys travel as hex, not base64. The private
and preshared keys in a `get` answer are dropped while parsing (the device's public key is
derived from the private one first), and no key ever appears in an error.
"""
from __future__ import annotations

import base64
import binascii
import socket

from .wireguard import (DeviceDump, PeerConfig, PeerOp, PeerStats, WireGuardError,
                        canonical_endpoint, canonical_prefixes, public_key_of)

TIMEOUT = 5.0  # seconds for one request; wireguard-go answers in about a millisecond
MAX_ANSWER = 16 << 20  # a device with thousands of peers is a few MB


def hex_key(key: str) -> str:
    return base64.b64decode(key).hex()


def b64_key(hex_text: str) -> str:
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError("malformed key in the UAPI answer")
    return base64.b64encode(raw).decode()


def peer_lines(op: PeerOp) -> list[str]:
    """One peer's `set` lines; what `PeerOp.wg_args` says to `wg set`."""
    key = f"public_key={hex_key(op.public_key)}"
    if op.remove:
        return [key, "remove=true"]
    lines = [key, "remove=true", key] if op.fresh else [key]
    if op.endpoint is not None:
        lines.append(f"endpoint={op.endpoint}")
    if op.allowed_ips is not None:
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={p}" for p in op.allowed_ips]
    if op.keepalive is not None:
        lines.append(f"persistent_keepalive_interval={op.keepalive}")
    return lines


def parse_get(text: str) -> DeviceDump:
    """The answer to `get=1` as a DeviceDump. Raises ValueError naming a line number only."""
    public_key, listen_port = None, 0
    peers: dict[str, PeerConfig] = {}
    stats: dict[str, PeerStats] = {}
    peer: dict | None = None

    def close_peer():
        if peer is None:
            return
        key, endpoint = peer["key"], peer.get("endpoint")
        sec = peer.get("hs_sec", 0) + peer.get("hs_nsec", 0) / 1e9
        peers[key] = PeerConfig(key, endpoint, canonical_prefixes(peer["allowed"]),
                                peer.get("keepalive", 0))
        stats[key] = PeerStats(key, endpoint, sec or None, peer.get("rx", 0), peer.get("tx", 0))

    for n, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"malformed UAPI answer line {n}")
        try:
            if name == "private_key":
                public_key = public_key_of(b64_key(value)) if value.strip("0") else None
            elif name == "listen_port":
                listen_port = int(value)
            elif name == "public_key":
                close_peer()
                peer = {"key": b64_key(value), "allowed": []}
            elif peer is None:
                continue  # fwmark, errno and device fields we do not manage
            elif name == "endpoint":
                peer["endpoint"] = canonical_endpoint(value)
            elif name == "allowed_ip":
                peer["allowed"].append(value)
            elif name == "last_handshake_time_sec":
                peer["hs_sec"] = int(value)
            elif name == "last_handshake_time_nsec":
                peer["hs_nsec"] = int(value)
            elif name == "rx_bytes":
                peer["rx"] = int(value)
            elif name == "tx_bytes":
                peer["tx"] = int(value)
            elif name == "persistent_keepalive_interval":
                peer["keepalive"] = int(value)
        except (ValueError, binascii.Error):
            raise ValueError(f"malformed UAPI answer line {n}") from None
    close_peer()
    return DeviceDump(public_key, listen_port, peers, stats)


def _request(path: str, body: str) -> str:
    """Send one request; the answer up to its blank line, checked for errno=0."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(body.encode())
            answer = b""
            while not (answer.endswith(b"\n\n") or len(answer) > MAX_ANSWER):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError as e:
        raise WireGuardError(f"wireguard-go's control socket {path}: {e.strerror or e}") from None
    text = answer.decode(errors="replace")
    last = text.rstrip("\n").rpartition("\n")[2]
    if last != "errno=0":
        what = body.partition("\n")[0]
        raise WireGuardError(f"wireguard-go refused {what} on {path}: {last or 'no answer'}")
    return text


def get(path: str) -> DeviceDump:
    return parse_get(_request(path, "get=1\n\n"))


def set_device(path: str, lines: list[str]) -> None:
    """Apply `lines` (device fields first, then peer sections) in one request."""
    if lines:
        _request(path, "set=1\n" + "".join(line + "\n" for line in lines) + "\n")
