"""Files replaced atomically and durably: the journal's and state store's, and the agent's
state directory. A module of its own so that the agent, which needs only this, does not
import the Raft journal and pysyncobj at its start."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or file creation in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Atomically replace `path` with `data`: tmp file, fsync, rename, fsync dir; without
    `durable`, atomically only (no fsync: after a power cut the file may be the old one)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
