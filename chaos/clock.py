"""Wall-clock faults through Debian's libfaketime (`apt install faketime`).

With `clock` among the faults every replica starts under libfaketime reading its offset
from a control file (re-read at most once a second), "+0" outside clock windows; a fault
writes another offset into one replica's file. Only the wall clock moves
(DONT_FAKE_MONOTONIC): NTP steps and skewed hosts move CLOCK_REALTIME, never the
monotonic clock that Raft timers use. Caveat: libfaketime 0.9.10's clock_nanosleep wrapper
answers EINVAL under DONT_FAKE_MONOTONIC, so `time.sleep` raises in a faked process; a
replica's normal paths wait with poll/epoll and condition variables, which work.
FAKETIME_FORCE_MONOTONIC_FIX=0: libfaketime turns that fix on by itself on glibc >= 2.30,
and it then misplaces the deadline of every wait on a monotonic condition variable,
CPython's GIL among them; a faked replica ran 20-60x slower (a 3-replica run served 165
instead of 3,700 ops/s, and Raft ticks stalled for up to 4 s, so the clock fault cost
availability on every other fault of its run). With the fix off the waits are right
and the wall clock still moves.
"""
from __future__ import annotations

import os

LIBRARIES = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
             "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
             "/usr/lib/faketime/libfaketimeMT.so.1")


def library() -> str | None:
    return next((p for p in LIBRARIES if os.path.exists(p)), None)


def control_file(directory: str, rid: str) -> str:
    return os.path.join(directory, f"{rid}.faketime")


def prefix(control: str) -> list[str]:
    """argv prefix that starts a process with its wall clock offset by `control`'s content."""
    set_offset(control, 0)
    return ["env", f"LD_PRELOAD={library()}", f"FAKETIME_TIMESTAMP_FILE={control}",
            "FAKETIME_CACHE_DURATION=1", "DONT_FAKE_MONOTONIC=1", "FAKETIME_FORCE_MONOTONIC_FIX=0"]


def set_offset(control: str, seconds: int) -> None:
    """Atomically: libfaketime must never read a half-written offset."""
    tmp = control + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{seconds:+d}\n")
    os.replace(tmp, control)
