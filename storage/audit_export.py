"""Continuous export of the audit log outside the cluster (JSON lines to a file or HTTP).

So the control plane is not the only audit store: each replica configured with a sink
ships every committed audit entry, in order, at least once. The cursor (last exported
seq) is kept beside the data; a sink sees an entry again only after a crash between
shipping and saving the cursor, and `raftmesh audit verify` tolerates nothing else.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

import aiohttp

from .durable_files import write_file_durably
from .state_store import StateStore

log = logging.getLogger("raftmesh.audit_export")
BATCH = 500


class AuditExporter:
    def __init__(self, store: StateStore, data_dir: str, file_path: str = "", url: str = ""):
        self.store, self.file_path, self.url = store, file_path, url
        self.cursor_path = os.path.join(data_dir, "audit_export.cursor")
        self.wakeup = asyncio.Event()

    def _cursor(self) -> int:
        try:
            with open(self.cursor_path) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def _pending(self, after: int) -> list[dict]:
        with self.store.read() as txn:
            out = []
            for _, e in txn.items("audit", f"{after + 1:016d}"):
                out.append(e)
                if len(out) >= BATCH:
                    break
            return out

    async def _ship(self, session: aiohttp.ClientSession | None, entries: list[dict]) -> None:
        lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
        if self.file_path:
            fd = os.open(self.file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, lines.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.url and session is not None:
            async with session.post(self.url, data=lines,
                                    headers={"Content-Type": "application/x-ndjson"}) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"audit sink answered {resp.status}")

    async def run(self) -> None:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) if self.url else None
        try:
            cursor = self._cursor()
            while True:
                entries = self._pending(cursor)
                if entries:
                    try:
                        await self._ship(session, entries)
                    except Exception as e:  # sink down: keep the cursor, retry later
                        log.warning("audit export failed, will retry: %s", e)
                        await asyncio.sleep(2)
                        continue
                    cursor = entries[-1]["seq"]
                    write_file_durably(self.cursor_path, str(cursor).encode())
                    continue
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            if session is not None:
                await session.close()
