"""The one-way partition and clock faults: their schedule shapes, the nftables rule that
drops one direction only, and libfaketime moving a process's wall clock but not its
monotonic clock."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from raftmesh.chaos import availability, clock
from raftmesh.chaos.schedule import CLOCK_JUMP, CLOCK_SKEW, make_schedule
from raftmesh.lab import replica_net as netlab

needs_netns = pytest.mark.skipif(bool(netlab.preflight()), reason="needs root, iproute2 and nftables")


def test_oneway_and_clock_windows_target_one_replica_and_are_judged_for_availability():
    events = [e for e in make_schedule(3, 300, ["oneway", "clock"], 5) if e.kind in ("oneway", "clock")]
    assert {e.params.get("drop") for e in events if e.kind == "oneway"} == {"in", "out"}
    clocks = [e for e in events if e.kind == "clock"]
    assert {e.params["mode"] for e in clocks} == {"skew", "jump"}
    for e in clocks:
        low, high = CLOCK_SKEW if e.params["mode"] == "skew" else CLOCK_JUMP
        assert low <= abs(e.params["seconds"]) <= high and e.target in {f"r{i}" for i in range(1, 6)}
    for e in events:
        assert availability.single_replica({"kind": e.kind, "target": "r1", "params": e.params})


@pytest.mark.skipif(clock.library() is None, reason="needs libfaketime (apt install faketime)")
@pytest.mark.timeout(30)
def test_libfaketime_moves_the_wall_clock_of_one_process_and_leaves_its_monotonic_clock(tmp_path):
    control = str(tmp_path / "r1.faketime")
    code = ("import select, sys, time\n"
            "m0, w0 = time.monotonic(), time.time()\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "deadline = time.monotonic() + 10\n"
            "while time.time() - w0 < 3000 and time.monotonic() < deadline:\n"
            "    select.select([], [], [], 0.1)\n"
            "print(round(time.time() - w0), round(time.monotonic() - m0), flush=True)\n")
    proc = subprocess.Popen(clock.prefix(control) + [sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        clock.set_offset(control, 3600)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wall, mono = map(int, proc.stdout.readline().split())
        assert wall >= 3600 and mono < 5, (wall, mono)
        assert abs(time.time() - time.time()) < 1, "this process's clock is untouched"
    finally:
        proc.kill()
        proc.wait()


@needs_netns
@pytest.mark.timeout(60)
def test_a_deaf_replica_drops_what_it_receives_and_still_sends():
    net = netlab.ReplicaNet(3)
    try:
        net.setup()
        net.set_rules(0, netlab.NetRules(deaf_to={net.ips[1]}))
        rules = net.ruleset(0)
        assert f"ip saddr {{ {net.ips[1]} }} drop" in rules or f"ip saddr {net.ips[1]} drop" in rules
        assert "daddr" not in rules, "nothing it sends is dropped"

        def arrives(i, j):
            """Does a UDP datagram from replica i reach replica j?"""
            recv = subprocess.Popen(net.prefix(j) + [sys.executable, "-c", (
                "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.bind((sys.argv[1], 7400)); s.settimeout(2); print('up', flush=True)\n"
                "try: s.recv(10); print('got')\nexcept OSError: print('none')"), net.ips[j]],
                stdout=subprocess.PIPE, text=True)
            try:
                assert recv.stdout.readline().strip() == "up"
                subprocess.run(net.prefix(i) + [sys.executable, "-c", (
                    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    "for _ in range(3): s.sendto(b'x', (sys.argv[1], 7400))"), net.ips[j]], timeout=10, check=True)
                return recv.stdout.readline().strip() == "got"
            finally:
                recv.kill()
                recv.wait()
        assert not arrives(1, 0) and arrives(0, 1), "r1 does not hear r2, r2 hears r1"
        assert arrives(2, 0) and arrives(0, 2)
        net.heal()
        assert arrives(1, 0)
    finally:
        net.close()
