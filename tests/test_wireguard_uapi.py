"""wireguard-go's control socket spoken directly: the answer parsed without its secrets, peer
changes written as `wg set` would make them, and a real wireguard-go driven through it."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest

from raftmesh.agent import wireguard_uapi as uapi
from raftmesh.agent.wireguard import (OVERLAY_ROUTES, PeerConfig, PeerOp, WireGuardError, WireGuardInterface,
                                      generate_private_key, public_key_of)
from raftmesh.proto.wire import Peer

PRIVATE = generate_private_key()
KEY_B = public_key_of(generate_private_key())
KEY_C = public_key_of(generate_private_key())
PSK = base64.b64encode(os.urandom(32)).decode()


def _hex(key: str) -> str:
    return base64.b64decode(key).hex()


ANSWER = (f"private_key={_hex(PRIVATE)}\nlisten_port=51820\nfwmark=0\n"
          f"public_key={_hex(KEY_B)}\npreshared_key={_hex(PSK)}\nprotocol_version=1\n"
          "endpoint=192.0.2.2:51820\nlast_handshake_time_sec=1700000000\n"
          "last_handshake_time_nsec=500000000\ntx_bytes=5678\nrx_bytes=1234\n"
          "persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=10.9.0.0/24\n"
          f"public_key={_hex(KEY_C)}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
          "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\nerrno=0\n\n")


def test_the_answer_parses_like_a_wg_dump_and_keeps_no_secret():
    d = uapi.parse_get(ANSWER)
    assert d.public_key == public_key_of(PRIVATE) and d.listen_port == 51820
    assert d.peers[KEY_B] == PeerConfig(KEY_B, "192.0.2.2:51820", ("10.9.0.0/24", "100.64.0.2/32"), 25)
    assert d.peers[KEY_C] == PeerConfig(KEY_C, None, (), 0)
    assert d.stats[KEY_B].latest_handshake == 1700000000.5
    assert (d.stats[KEY_B].rx_bytes, d.stats[KEY_B].tx_bytes) == (1234, 5678)
    assert d.stats[KEY_C].latest_handshake is None
    for secret in (PRIVATE, PSK, _hex(PRIVATE), _hex(PSK)):
        assert secret not in repr(d)


def test_a_malformed_answer_names_its_line_and_never_its_content():
    bad = ANSWER.replace(f"public_key={_hex(KEY_C)}", f"public_key={_hex(PRIVATE)[:-2]}")
    with pytest.raises(ValueError, match="line 15") as e:
        uapi.parse_get(bad)
    assert _hex(PRIVATE)[:-2] not in str(e.value)
    with pytest.raises(ValueError, match="line 1"):
        uapi.parse_get(f"{_hex(PRIVATE)}\n\n")


def test_peer_changes_are_the_lines_wg_set_would_write():
    h = _hex(KEY_B)
    assert uapi.peer_lines(PeerOp(KEY_B, remove=True)) == [f"public_key={h}", "remove=true"]
    assert uapi.peer_lines(PeerOp(KEY_B, endpoint="192.0.2.9:41641")) == \
        [f"public_key={h}", "endpoint=192.0.2.9:41641"]
    assert uapi.peer_lines(PeerOp(KEY_B, endpoint="192.0.2.9:1", allowed_ips=("100.64.0.2/32",),
                                  keepalive=0, fresh=True)) == \
        [f"public_key={h}", "remove=true", f"public_key={h}", "endpoint=192.0.2.9:1",
         "replace_allowed_ips=true", "allowed_ip=100.64.0.2/32", "persistent_keepalive_interval=0"]
    assert uapi.peer_lines(PeerOp(KEY_B, allowed_ips=())) == [f"public_key={h}", "replace_allowed_ips=true"]


def test_a_missing_socket_is_a_clear_error(tmp_path):
    with pytest.raises(WireGuardError, match="control socket"):
        uapi.get(str(tmp_path / "absent.sock"))


needs_wireguard_go = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("wireguard-go") or not os.path.exists("/dev/net/tun"),
    reason="needs root, wireguard-go and /dev/net/tun")


@needs_wireguard_go
@pytest.mark.timeout(60)
def test_a_real_wireguard_go_is_configured_read_and_refuses_nonsense_through_its_socket():
    ns = f"rmuapi{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    wg = WireGuardInterface(f"rmu{os.getpid() % 100000}", ns, kernel=False)
    try:
        wg.create()
        wg.configure(PRIVATE, 51820, ["100.64.0.1/32"])
        assert wg.routes() == set(OVERLAY_ROUTES)  # with the link: a joining peer adds none
        wg.assign_addresses_soon(["100.64.0.1/32", "100.64.0.9/32"])  # ip runs meanwhile
        wg.set_addresses(["100.64.0.1/32", "100.64.0.9/32"])  # waits for it: nothing left to do
        assert wg.addresses() == {"100.64.0.1/32", "100.64.0.9/32"}
        wg._own_addresses = set()  # believes the link bare: the next `address add` fails...
        wg.assign_addresses_soon(["100.64.0.1/32"])
        wg.set_addresses(["100.64.0.1/32"])  # ...so it asks the link and removes .9 only
        assert wg.addresses() == {"100.64.0.1/32"}
        peers = [Peer(id="2", name="b", node_key=KEY_B, addresses=("100.64.0.2/32",),
                      allowed_ips=("100.64.0.2/32", "10.9.0.0/24"), endpoints=("192.0.2.2:51820",)),
                 Peer(id="3", name="c", node_key=KEY_C, addresses=("100.64.0.3/32",),
                      allowed_ips=("100.64.0.3/32",), endpoints=())]
        wg.reconcile(peers[1:], keepalive=25, new_peers_initiate=False)
        assert wg.dump().peers[KEY_C].keepalive == 0  # waits for a first handshake
        wg.arm_keepalive([KEY_C], 25)
        first = wg.reconcile(peers, keepalive=25)
        assert first.routes_added == ("10.9.0.0/24",)
        d = wg.dump()
        assert d.public_key == public_key_of(PRIVATE) and d.listen_port == 51820
        assert d.peers[KEY_B] == PeerConfig(KEY_B, "192.0.2.2:51820", ("10.9.0.0/24", "100.64.0.2/32"), 25)
        assert d.peers[KEY_C] == PeerConfig(KEY_C, None, ("100.64.0.3/32",), 25)
        # `wg` reads the same device: the socket and the tool agree.
        shown = subprocess.run(["ip", "netns", "exec", ns, "wg", "show", wg.name, "allowed-ips"],
                               capture_output=True, text=True, check=True).stdout
        assert "10.9.0.0/24" in shown and KEY_C in shown
        assert not wg.reconcile(peers, keepalive=25).changed  # nothing differs, nothing sent
        assert not wg.reconcile(peers[:1], keepalive=25).routes_removed
        assert set(wg.dump().peers) == {KEY_B} and wg.routes() == {*OVERLAY_ROUTES, "10.9.0.0/24"}
        assert wg.set_endpoint(KEY_B, "192.0.2.7:41641")
        assert wg.dump().peers[KEY_B].endpoint == "192.0.2.7:41641"
        assert wg.reconcile([], keepalive=25).routes_removed == ("10.9.0.0/24",)
        with pytest.raises(WireGuardError, match="refused") as e:
            uapi.set_device(wg.socket_path, [f"private_key={_hex(PRIVATE)}", "listen_port=nonsense"])
        assert _hex(PRIVATE) not in str(e.value) and PRIVATE not in str(e.value)
    finally:
        wg.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
