"""The power-loss filesystem: lab/lazy_disk.py's model served over FUSE, one process per disk.

`python -m raftmesh.lab.lazy_fs --root DISK --mount DIR` serves DISK/backing at DIR until it
is unmounted, and answers on the unix socket DISK/control (one line per request):

* `freeze`: from now on nothing becomes durable: fsync and fsyncdir wait (the replica is
  about to be SIGKILLed; an fsync that returned before the freeze counts, like one that
  finished before the power went). Other operations go on and are undone by the cut, so a
  dying process's last writes and the kernel's flushes on close never block its death;
* `cut [SEED]`: the power cut proper (after the replica is dead): the backing directory
  becomes what a disk holds when the power returns (torn with SEED if given); every later
  operation fails with EIO, and the disk must be unmounted and served anew.

Mounted without `direct_io`, so memory maps work (LMDB maps data.mdb with `writemap`) and
reads are cached; without the writeback cache, every write(2) reaches this process before it
returns, and pages dirtied through a shared map reach it when msync(2) or the kernel's
writeback sends them (LMDB's env.sync is an msync, followed by fsync here). Pages still dirty
in the kernel at the cut never arrive: lost, as with a real power cut. The page cache is
dropped with the mount, so after the cut the replica reads what the disk kept.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import threading

import mfusepy as fuse

from .lazy_disk import LazyDisk

SYNC_FLAGS = os.O_SYNC | os.O_DSYNC


class LazyFS(fuse.Operations):
    use_ns = True

    def __init__(self, disk: LazyDisk):
        self.disk = disk
        self._mutex = threading.Lock()  # one operation at a time: the model is not thread-safe
        self._thawed = threading.Event()  # clear while frozen: durability points wait
        self._thawed.set()
        self._dead = False  # the power was cut: every operation fails
        self._synced_fds: set[int] = set()  # opened with O_SYNC/O_DSYNC: durable on return

    # -- the power ------------------------------------------------------------------------
    def _live(self):
        if self._dead:
            raise fuse.FuseOSError(errno.EIO)
        return self._mutex

    def _durability_point(self):
        self._thawed.wait()
        return self._live()

    def freeze(self) -> None:
        with self._mutex:  # an fsync in progress finishes first
            self._thawed.clear()

    def cut(self, seed: int | None) -> dict:
        with self._mutex:
            self._dead = True
            self._thawed.set()  # waiting fsyncs now fail
            return self.disk.power_cut(seed)

    # -- files ------------------------------------------------------------------------------
    def getattr(self, path, fh=None):
        with self._live():
            st = os.fstat(fh) if fh is not None else os.lstat(self.disk.real(path))
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")}
        return attrs | {"st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

    def readdir(self, path, fh):
        with self._live():
            return [".", ".."] + os.listdir(self.disk.real(path))

    def access(self, path, amode):
        with self._live():
            if not os.access(self.disk.real(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.disk.backing)
        return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_namemax")}

    def open(self, path, flags):
        return self._open(path, flags, 0)

    def create(self, path, mode, flags):
        return self._open(path, flags | os.O_CREAT, mode)

    def _open(self, path, flags, mode):
        with self._live():
            fd = self.disk.open(path, flags, mode)
            if flags & SYNC_FLAGS:
                self._synced_fds.add(fd)
            return fd

    def read(self, path, size, offset, fh):
        with self._live():
            return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if fh in self._synced_fds:
            with self._durability_point():
                return self.disk.write(fh, data, offset, synced=True)
        with self._live():
            return self.disk.write(fh, data, offset)

    def truncate(self, path, length, fh=None):
        with self._live():
            if fh is not None:
                return self.disk.truncate(fh, length)
            fd = os.open(self.disk.real(path), os.O_RDWR)
            try:
                self.disk.truncate(fd, length)
            finally:
                os.close(fd)

    def fsync(self, path, datasync, fh):
        with self._durability_point():
            self.disk.fsync(fh)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        self._synced_fds.discard(fh)
        os.close(fh)
        return 0

    # -- directories ------------------------------------------------------------------------
    def mkdir(self, path, mode):
        with self._live():
            self.disk.mkdir(path, mode)

    def rmdir(self, path):
        with self._live():
            self.disk.rmdir(path)

    def unlink(self, path):
        with self._live():
            self.disk.unlink(path)

    def rename(self, old, new, flags=0):
        if flags:
            raise fuse.FuseOSError(errno.EINVAL)
        with self._live():
            self.disk.rename(old, new)

    def fsyncdir(self, path, datasync, fh):
        with self._durability_point():
            self.disk.fsync_dir(path)
        return 0

    # -- metadata, not modelled ---------------------------------------------------------------
    def chmod(self, path, mode):
        with self._live():
            os.chmod(self.disk.real(path), mode)

    def chown(self, path, uid, gid):
        with self._live():
            os.chown(self.disk.real(path), uid, gid)

    def utimens(self, path, times=None):
        with self._live():
            os.utime(self.disk.real(path), ns=times)


def serve_control(fs: LazyFS, path: str) -> None:
    """The controller's requests (module doc), one connection at a time."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rw") as f:
            for line in f:
                words = line.split()
                if words == ["ping"]:
                    answer = "ok"
                elif words == ["freeze"]:
                    fs.freeze()
                    answer = "frozen"
                elif words[:1] == ["cut"]:
                    answer = json.dumps(fs.cut(int(words[1]) if len(words) > 1 else None))
                else:
                    answer = f"error: unknown request {line.strip()!r}"
                f.write(answer + "\n")
                f.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftmesh.lab.lazy_fs", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the disk: backing/ and the control socket live here")
    p.add_argument("--mount", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = os.path.abspath(args.root)
    fs = LazyFS(LazyDisk(os.path.join(root, "backing"), os.path.join(root, "holding")))
    control = os.path.join(root, "control")
    if os.path.exists(control):
        os.unlink(control)
    threading.Thread(target=serve_control, args=(fs, control), daemon=True).start()
    fuse.FUSE(fs, args.mount, foreground=True, allow_other=True, default_permissions=True,
              fsname="raftmesh-lazyfs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
