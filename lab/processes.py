"""Processes the lab starts, found and ended by pid: children, CPU time, stopping.

Every test, chaos run and benchmark ends what it started by its pid (a pid that was reused
meanwhile is left alone, by its start time)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def run(argv: list[str], *, input: str | None = None, timeout: float = 15,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (state first); [] if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def proc_start_time(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 else None


def pid_running(pid: int) -> bool:
    """True unless the process is gone (a zombie counts as gone: it ended, unreaped)."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


def child_pids(pid: int | str = "self") -> list[int]:
    """Direct children of a process, over all its threads."""
    children: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return sorted(children)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (0 for those gone)."""
    ticks = 0
    for pid in pids:
        fields = proc_stat(pid)
        if len(fields) > 12:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    return pid_running(pid)


def stop_pid(pid: int, start_time: int | None = None, timeout: float = 5.0) -> None:
    """SIGTERM then SIGKILL one process by pid (left alone if the pid was reused). A SIGCONT
    first, since a process paused with SIGSTOP (chaos faults) would not act on SIGTERM."""
    for sig in (signal.SIGCONT, signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid) or (start_time is not None and proc_start_time(pid) != start_time):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGCONT:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)


def stop_proc(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until truthy (returned) or raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def cleaned_up_on_sigterm(main):
    """Benchmarks and chaos runs start replicas, agents, etcd and namespaces, and end them in
    `finally` blocks; Python's default SIGTERM action skips those and leaves them running.
    SIGTERM here raises SystemExit instead, like Ctrl-C.

    The SystemExit can also land inside subprocess.Popen after its fork, before the caller
    holds the Popen (seen once in CI: a replica outlived its bench): so after the cleanup,
    any child process still running is ended by pid as well."""
    def wrapped(args) -> int:
        def terminate(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
            print(f"\n{sys.argv[0]}: SIGTERM, stopping what this run started", file=sys.stderr)
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, terminate)
        try:
            return main(args)
        except SystemExit:
            _end_children()
            raise
    return wrapped


def _end_children() -> None:
    for pid in child_pids():
        stop_pid(pid)
