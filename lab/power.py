"""Power cuts for lab replicas: each replica's data directory is a power-loss filesystem
(lab/lazy_fs.py) and the replica sees a boot id of its own, so a cut is an OS restart to it.

A cut (`power_cut`) freezes the disks of the replicas it hits (nothing becomes durable any
more), SIGKILLs the replicas, throws away what their disks had not made durable, and serves
the disks again with a new boot id: the replicas come back as after the power returned
(storage/state_store.py keys its "unsynced since boot" marker to the boot id).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

from .processes import run, stop_proc, wait_until

BOOT_ID = "/proc/sys/kernel/random/boot_id"
# Runs the command with this disk's boot id bound over the kernel's, in the mount namespace
# the command already has (ip netns exec makes one) or that `unshare -m` gives it.
_WITH_BOOT_ID = 'mount --bind "$0" ' + BOOT_ID + ' && exec "$@"'


def preflight() -> list[str]:
    """What this machine lacks for power cuts (empty when they can run)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("power cuts need root (FUSE mounts, a boot id per replica)")
    if not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 missing (Debian package fuse3)")
    try:
        import mfusepy  # noqa: F401  (the test extra)
    except (ImportError, OSError) as e:
        problems.append(f"mfusepy unusable: {e}")
    return problems


class PowerLossDisk:
    """One replica's disk: `root`/backing served at `mountpoint` by a lazy_fs process."""

    def __init__(self, root: str, mountpoint: str):
        self.root, self.mountpoint = os.path.abspath(root), os.path.abspath(mountpoint)
        self.boot_id_file = os.path.join(self.root, "boot_id")
        self.proc: subprocess.Popen | None = None
        os.makedirs(os.path.join(self.root, "backing"), mode=0o700, exist_ok=True)
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
        self._new_boot()

    def _new_boot(self) -> None:
        with open(self.boot_id_file, "w") as f:
            f.write(str(uuid.uuid4()) + "\n")

    def boot_prefix(self) -> list[str]:
        """argv prefix giving the command this disk's boot id (inside its own mount namespace)."""
        return ["sh", "-c", _WITH_BOOT_ID, self.boot_id_file]

    # -- serving ----------------------------------------------------------------------------
    def mount(self, timeout: float = 15) -> None:
        log = open(os.path.join(self.root, "lazy_fs.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "raftmesh.lab.lazy_fs", "--root", self.root,
                                      "--mount", self.mountpoint], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"lazy_fs for {self.mountpoint} exited with {self.proc.returncode} "
                                   f"(log: {self.root}/lazy_fs.log)")
            return self.mounted() and self._request("ping") == "ok"
        wait_until(ready, timeout, what=f"the power-loss filesystem at {self.mountpoint}")

    def mounted(self) -> bool:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == self.mountpoint for line in f)

    def unmount(self) -> None:
        """Unmount (lazily if still busy) and end the server by its pid. The server outlives
        the unmount while another mount namespace holds a copy of the mount (every replica's
        `ip netns exec` namespace copies the mounts of the others): it is ended after a
        moment, and such a copy, which nothing uses, fails with ENOTCONN from then on."""
        if self.mounted():
            if run(["fusermount3", "-u", self.mountpoint], check=False).returncode != 0:
                run(["fusermount3", "-u", "-z", self.mountpoint], check=False)
        if self.proc is not None:
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                stop_proc(self.proc)
            self.proc = None

    def _request(self, line: str) -> str:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(os.path.join(self.root, "control"))
                with s.makefile("rw") as f:
                    f.write(line + "\n")
                    f.flush()
                    return f.readline().strip()
        except OSError as e:
            return f"error: {e}"

    def set_aside(self, aside: str) -> None:
        """Keep this disk's data at `aside` and serve an empty disk (a replica replaced)."""
        self.unmount()
        os.rename(self.root, aside)
        os.makedirs(os.path.join(self.root, "backing"), mode=0o700)
        self._new_boot()
        self.mount()

    # -- the cut ------------------------------------------------------------------------------
    def freeze(self) -> None:
        answer = self._request("freeze")
        if answer != "frozen":
            raise RuntimeError(f"freezing {self.mountpoint}: {answer}")

    def cut(self, torn_seed: int | None = None) -> dict:
        """After freeze() and SIGKILL: drop what was not durable; every later operation fails.
        Waiting fsyncs fail too, which lets the killed process finish dying: a FUSE request
        already taken by the server is waited for uninterruptibly."""
        answer = self._request("cut" if torn_seed is None else f"cut {torn_seed}")
        if not answer.startswith("{"):
            raise RuntimeError(f"cutting the power of {self.mountpoint}: {answer}")
        return json.loads(answer)

    def power_on(self) -> None:
        """Serve the disk anew (an empty page cache) under a new boot id."""
        self.unmount()
        self._new_boot()
        self.mount()


def power_cut(victims: list[tuple[PowerLossDisk, subprocess.Popen | None]],
              torn_seed: int | None = None) -> list[dict]:
    """Cut the power of every (disk, replica process) at once: no disk makes anything durable
    from the first freeze on, the processes are SIGKILLed (no user code runs in them after
    that, so nothing they do depends on what follows), each disk loses what it had not made
    durable, and is served again once its process is gone. The caller restarts the replicas."""
    for disk, _ in victims:
        disk.freeze()
    alive = [p for _, p in victims if p is not None and p.poll() is None]
    for proc in alive:
        proc.kill()
    reports = [disk.cut(torn_seed) for disk, _ in victims]
    for proc in alive:
        proc.wait(30)
    for disk, _ in victims:
        disk.power_on()
    return reports
