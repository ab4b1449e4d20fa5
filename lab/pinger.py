"""An ICMP echo prober that remembers every probe: `python -m raftmesh.lab.pinger DST OUT`.

`ping` only counts; a chaos run needs to know which probe was lost and when, to set it
against the fault windows. Probes go out every --interval s until SIGTERM; then the prober
waits --grace s for the replies still in flight and writes OUT as JSON:
{"dst", "interval", "probes": [[sent_monotonic, reply_monotonic or null], ...]}.
Times are CLOCK_MONOTONIC, which every process on the host shares, so the run can place
them on its own timeline. Prints "ready" once its socket is open.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import time

PAYLOAD = b"raftmesh-tunnel"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff


def echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(header + PAYLOAD), ident, seq) + PAYLOAD


def probe(dst: str, interval: float, grace: float) -> list[list[float | None]]:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(time.monotonic()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xffff
    probes: list[list[float | None]] = []
    pending: dict[int, int] = {}  # ICMP sequence (16 bits) -> index in probes
    print("ready", flush=True)
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if stopping and (now > stopping[0] + grace or not pending):
            break
        if not stopping and now >= next_send:
            seq = len(probes) & 0xffff
            pending[seq] = len(probes)
            probes.append([now, None])
            try:
                sock.sendto(echo_request(ident, seq), (dst, 0))
            except OSError:  # no route while the tunnel is down: a lost probe, not a crash
                pass
            next_send += interval
        wait = (stopping[0] + grace if stopping else next_send) - time.monotonic()
        try:
            readable = select.select([sock], [], [], max(0.0, wait))[0]
        except InterruptedError:
            continue
        if not readable:
            continue
        data, (src, _) = sock.recvfrom(2048)
        ihl = (data[0] & 0x0f) * 4
        kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if kind == 0 and rid == ident and src == dst and rseq in pending:
            probes[pending.pop(rseq)][1] = time.monotonic()
    return probes


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m raftmesh.lab.pinger")
    p.add_argument("dst")
    p.add_argument("out")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--grace", type=float, default=2.0, help="seconds to wait for late replies after SIGTERM")
    args = p.parse_args()
    probes = probe(args.dst, args.interval, args.grace)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"dst": args.dst, "interval": args.interval, "probes": probes}, f)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
