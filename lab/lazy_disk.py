"""What a disk keeps across a power cut: the durability model behind the lab's power-loss
filesystem (lab/lazy_fs.py serves it over FUSE; lab/power.py cuts the power).

SIGKILL keeps the kernel's page cache, so a missing fsync is invisible to process-kill tests.
This model writes through to a backing directory (reads see the latest state, as the page
cache would show them) and keeps aside what a power cut would take, as POSIX allows it:

* file data: every write and truncation since the file's last fsync/fdatasync (or made on a
  descriptor opened with O_SYNC/O_DSYNC, durable as it returns) is undone by a cut; the
  undo log holds the bytes each write replaced, within the file's durable size;
* directory entries: creates, renames, unlinks and mkdirs since the directory's last fsync
  are undone by a cut (fsync of a file does not make its name durable: fsync(2)). Unlinked
  and replaced files are kept aside until then, so their durable image can come back;
* torn writes (optional, seeded): instead of losing all of them, a cut keeps a random
  subset of the unsynced writes' 512-byte sectors, as a device persisting a batch's
  sectors in any order would.

Not modelled: rmdir, hard links and symlinks (refused), metadata other than size (mode,
times: kept as written), and reordering between files (a cut is one instant for the disk).
Files are identified by their backing inode number, which renames keep.
"""
from __future__ import annotations

import os
import random
import shutil
import stat
from dataclasses import dataclass, field

SECTOR = 512
_ASIDE = ".aside"  # in the holding directory: files unlinked or replaced, not yet durably


@dataclass
class _PendingFile:
    """A file's changes since its last fsync: enough to bring back its durable image."""

    durable_size: int
    undo: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes replaced)
    writes: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes written)


class LazyDisk:
    """A backing directory plus everything a power cut would take back from it.

    `holding` must be a directory on the same file system as `backing`, outside it: files
    set aside live there until their absence is durable."""

    def __init__(self, backing: str, holding: str):
        self.backing = os.path.abspath(backing)
        self.holding = os.path.abspath(holding)
        os.makedirs(os.path.join(self.holding, _ASIDE), exist_ok=True)
        self._files: dict[int, _PendingFile] = {}  # inode -> changes since its fsync
        self._dirs: dict[int, dict[str, int]] = {}  # dir inode -> durable entries (name -> inode)

    # -- paths ------------------------------------------------------------------------------
    def real(self, path: str) -> str:
        """The backing path of a path inside the disk ("/a/b")."""
        return os.path.join(self.backing, path.lstrip("/"))

    # -- file data --------------------------------------------------------------------------
    def _pending(self, fd: int) -> _PendingFile:
        st = os.fstat(fd)
        if st.st_ino not in self._files:
            self._files[st.st_ino] = _PendingFile(st.st_size)
        return self._files[st.st_ino]

    def write(self, fd: int, data: bytes, offset: int, synced: bool = False) -> int:
        """pwrite through to the backing file, keeping what it replaced until an fsync."""
        pending = self._pending(fd)
        end = min(offset + len(data), pending.durable_size)
        if offset < end:
            pending.undo.append((offset, os.pread(fd, end - offset, offset)))
        pending.writes.append((offset, bytes(data)))
        written = os.pwrite(fd, data, offset)
        if synced:
            self.fsync(fd)
        return written

    def truncate(self, fd: int, length: int) -> None:
        pending = self._pending(fd)
        size = os.fstat(fd).st_size
        end = min(size, pending.durable_size)
        if length < end:
            pending.undo.append((length, os.pread(fd, end - length, length)))
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        """The file's data as it is now is what a cut leaves of it."""
        self._files.pop(os.fstat(fd).st_ino, None)

    # -- directory entries ------------------------------------------------------------------
    def _touch_dir(self, real_dir: str) -> None:
        """Before the first change to a directory since its fsync, note its durable entries."""
        ino = os.stat(real_dir).st_ino
        if ino not in self._dirs:
            self._dirs[ino] = {e.name: e.inode() for e in os.scandir(real_dir)}

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """open(2), creating the file (a new directory entry) when O_CREAT asks for it;
        O_TRUNC is carried out as a truncation the model can undo."""
        real = self.real(path)
        created = bool(flags & os.O_CREAT) and not os.path.lexists(real)
        if created:
            self._touch_dir(os.path.dirname(real))
        # Read-write whatever the caller asked (the kernel checks its access mode): the undo
        # log reads what a write replaces. No O_APPEND: the kernel sends each write's offset.
        access = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        fd = os.open(real, flags & ~(os.O_TRUNC | os.O_ACCMODE | os.O_APPEND) | access, mode)
        if created:
            self._files[os.fstat(fd).st_ino] = _PendingFile(0)
        elif flags & os.O_TRUNC:
            self.truncate(fd, 0)
        return fd

    def mkdir(self, path: str, mode: int) -> None:
        real = self.real(path)
        self._touch_dir(os.path.dirname(real))
        os.mkdir(real, mode)
        self._dirs[os.stat(real).st_ino] = {}  # durable: nothing in it yet

    def unlink(self, path: str) -> None:
        real = self.real(path)
        self._touch_dir(os.path.dirname(real))
        self._set_aside(real)

    def rename(self, old: str, new: str) -> None:
        src, dst = self.real(old), self.real(new)
        self._touch_dir(os.path.dirname(src))
        self._touch_dir(os.path.dirname(dst))
        if os.path.lexists(dst) and not os.path.isdir(dst):
            self._set_aside(dst)
        os.rename(src, dst)

    def _set_aside(self, real: str) -> None:
        os.rename(real, os.path.join(self.holding, _ASIDE, str(os.lstat(real).st_ino)))

    def fsync_dir(self, path: str) -> None:
        """The directory's entries as they are now are what a cut leaves of them."""
        self._dirs.pop(os.stat(self.real(path)).st_ino, None)
        if not self._dirs:  # no changed directory can want a file set aside back
            self._clear_aside()

    def rmdir(self, path: str) -> None:
        """Not modelled: durable at once (the replica never removes a directory)."""
        real = self.real(path)
        self._dirs.pop(os.stat(real).st_ino, None)
        os.rmdir(real)

    # -- the cut ----------------------------------------------------------------------------
    def power_cut(self, torn_seed: int | None = None) -> dict:
        """Make the backing directory what the disk holds when the power comes back: each
        file's durable image (or, with `torn_seed`, plus a random subset of its unsynced
        sectors) under its durable names. Returns counts for the report."""
        where = self._locations()
        rng = random.Random(torn_seed) if torn_seed is not None else None
        undone = 0
        for ino, pending in self._files.items():
            if ino in where and not os.path.isdir(where[ino]):
                undone += len(pending.writes)
                self._restore(where[ino], pending, rng)
        entries = self._restore_entries(where)
        self._files.clear()
        self._dirs.clear()
        return {"writes_lost": undone, "entries_restored": entries}

    def _locations(self) -> dict[int, str]:
        """Every inode in the backing tree and set aside, by number."""
        found = {os.stat(self.backing).st_ino: self.backing}
        for top in (self.backing, os.path.join(self.holding, _ASIDE)):
            for parent, dirs, files in os.walk(top):
                for name in dirs + files:
                    p = os.path.join(parent, name)
                    found[os.lstat(p).st_ino] = p
        return found

    @staticmethod
    def _restore(real: str, pending: _PendingFile, rng: random.Random | None) -> None:
        with open(real, "r+b") as f:
            fd = f.fileno()
            for offset, old in reversed(pending.undo):
                os.pwrite(fd, old, offset)
            size = pending.durable_size
            os.ftruncate(fd, size)
            if rng is None:
                return
            for offset, data in pending.writes:  # in order: a later write wins its sectors
                for start in range(offset - offset % SECTOR, offset + len(data), SECTOR):
                    lo, hi = max(start, offset), min(start + SECTOR, offset + len(data))
                    if rng.random() < 0.5:
                        os.pwrite(fd, data[lo - offset:hi - offset], lo)
                        size = max(size, hi)
            os.ftruncate(fd, size)

    def _restore_entries(self, where: dict[int, str]) -> int:
        """Put every changed directory back to its durable entries. Entries that are not
        durable anywhere (created since, or whose directory went) are dropped."""
        dirs = {ino: where[ino] for ino in self._dirs if ino in where}
        staging = os.path.join(self.holding, ".staging")
        os.makedirs(staging, exist_ok=True)
        moved = 0
        for ino, real_dir in dirs.items():  # out with what is not durable where it is
            durable = self._dirs[ino]
            if not os.path.isdir(real_dir):
                continue
            for e in list(os.scandir(real_dir)):
                if durable.get(e.name) != e.inode():
                    os.rename(e.path, os.path.join(staging, str(e.inode())))
                    moved += 1
        aside = os.path.join(self.holding, _ASIDE)
        for ino, real_dir in dirs.items():  # in with what is durable but absent
            if not os.path.isdir(real_dir):
                continue
            for name, child in self._dirs[ino].items():
                target = os.path.join(real_dir, name)
                if os.path.lexists(target):
                    continue
                for source in (os.path.join(staging, str(child)), os.path.join(aside, str(child))):
                    if os.path.lexists(source):
                        os.rename(source, target)
                        moved += 1
                        break
        shutil.rmtree(staging)
        self._clear_aside()
        return moved

    def _clear_aside(self) -> None:
        aside = os.path.join(self.holding, _ASIDE)
        for name in os.listdir(aside):
            self._files.pop(int(name), None)  # its inode number may be reused
            p = os.path.join(aside, name)
            shutil.rmtree(p) if stat.S_ISDIR(os.lstat(p).st_mode) else os.unlink(p)
