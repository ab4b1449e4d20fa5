"""Deferred, coalesced acks of applied netmap versions.

An ack only feeds the control plane's propagation and revoke metrics; the agent already
acted on the frame. So it waits a jittered moment after the first unacked apply and then
covers every version applied meanwhile in one request. That keeps thousands of ack requests
out of the window in which the same replicas are still writing the change's frames, and a
burst of changes costs one ack, not one per version. Each version travels with how long ago
it was applied (the agent's monotonic clock), so the replica still measures the true time
to apply. Shared by the daemon and the benchmarks' light agents; no I/O here.
"""
from __future__ import annotations

ACK_DELAY = (1.0, 3.0)  # seconds after the first unacked apply, uniformly jittered: past the
#                         delivery burst of a change to thousands of agents (docs/agents.md)
MAX_LISTED = 64  # versions listed per ack (the API's limit); older ones are covered anyway


class PendingAcks:
    def __init__(self) -> None:
        self.applied: list[tuple[int, float]] = []  # (version, monotonic time applied)
        self.due_at: float | None = None

    def add(self, version: int, now: float, delay: float) -> None:
        """Record an applied version; `delay` (drawn by the caller from ACK_DELAY) is used
        only when this starts a new round."""
        self.applied.append((version, now))
        if len(self.applied) > MAX_LISTED:
            del self.applied[:len(self.applied) - MAX_LISTED]
        if self.due_at is None:
            self.due_at = now + delay

    def due(self, now: float) -> bool:
        return self.due_at is not None and now >= self.due_at

    def take(self, now: float) -> dict | None:
        """The ack body for everything applied so far, and start over (None if nothing)."""
        if not self.applied:
            self.due_at = None
            return None
        body = {"version": max(v for v, _ in self.applied),
                "applied": [[v, round(max(0.0, now - t), 4)] for v, t in self.applied]}
        self.applied, self.due_at = [], None
        return body

    def clear(self) -> None:
        """The stream ended: its replica can no longer match these acks to frames it sent."""
        self.applied, self.due_at = [], None
