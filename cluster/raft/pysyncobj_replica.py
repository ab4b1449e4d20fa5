"""One Raft replica (the `Raft` interface): pysyncobj 0.3.17 plus what raftmesh needs from it.

What pysyncobj does not do and this class adds (docs/durability.md has the reasoning):
* durability: entries are fsynced (storage/journal.py) before a follower acknowledges them
  and before a leader counts itself towards a commit, once per batch;
* Raft's commit rule on followers (commit index <= index of the last *new* entry), which
  pysyncobj only got right by truncating matching entries on every AppendEntries, and
  a commit index that a snapshot chunk does not move until the snapshot is installed;
* low latency without a busy loop: our own tick thread, woken by a pipe when a command is
  submitted, sends new entries at once instead of on the next period;
* commits that travel with the next entries (lazy_commit.py): a commit index nobody
  waits on is held for a few milliseconds, and a follower applies in batches;
* cheap replica-to-replica messages: AES-GCM instead of Fernet (transport_crypto.py),
  pickle protocol 5 and stored zlib streams (codec.py), and everything one tick
  sends to a peer (forwarded commands, their replies, AppendEntries,
  acks) coalesced into one framed message instead of one pickle/compress/seal/send each;
* linearizable reads through coalesced read barriers (one log entry per batch of reads);
* apply into LMDB idempotently by Raft index, one transaction per tick, with futures
  resolved only after that transaction commits;
* snapshots copied on a helper thread (background_snapshot.py), not in the tick;
* a removed peer's link kept until its removal commits (removed_peer_links.py), so a
  replica whose removal of that peer is rolled back still hears it as leader.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import pysyncobj.syncobj as pso
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.pipe_notifier import PipeNotifier

from raftmesh.cluster.commands import Barrier, Command
from raftmesh.cluster.config import ReplicaConfig
from raftmesh.storage import snapshot
from raftmesh.storage.journal import DurableJournal
from raftmesh.storage.state_store import StateStore

from . import Outcome, codec, connection
from .applied import ApplyListener, apply_entry, deliver
from .background_snapshot import BackgroundSerializer
from .lazy_commit import ForwardedCommands, Hold
from .pause import pause
from .removed_peer_links import RemovedPeerLinks
from .stall_watch import StallWatch
from .transport_crypto import AeadEncryptor

log = logging.getLogger("raftmesh.replica")

DISK_FULL = 100  # our own failure reason, beside pysyncobj's FAIL_REASON (see _wait_for_room)
NOT_APPLIED = {FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
               FAIL_REASON.NOT_LEADER, FAIL_REASON.REQUEST_DENIED, DISK_FULL}
ROOM_RETRY = 0.1  # seconds between looks for free space while the data directory is full
RAFT_STATES = {0: "follower", 1: "candidate", 2: "leader"}
# Several Raft messages for one peer, sent as one: pysyncobj pickles, compresses and seals
# each message it sends, and a follower forwards each client command as its own message.
BATCH = "rm_batch"
PREVOTE, PREVOTE_GRANTED = "rm_prevote", "rm_prevote_granted"  # see RaftReplica._hold_election
PREVOTE_AGAIN = 2  # heartbeats between pre-vote rounds
# Answers that count towards a majority: only from peers in this replica's configuration.
MEMBERS_ONLY = ("response_vote", "next_node_idx")
_journal_factory_lock = threading.Lock()
# Log compaction (see _SyncObj__tryLogCompaction): the journal must also hold this share of
# the last snapshot's bytes, unless it has this many entries.
SNAPSHOT_JOURNAL_SHARE = 0.5
SNAPSHOT_MAX_ENTRIES = 200_000


_handling = threading.local()  # set while a RaftReplica handles a Raft message


def _raft_clock() -> float:
    """The clock of pysyncobj's election deadline: CLOCK_MONOTONIC_RAW, not time.monotonic.
    NTP slews CLOCK_MONOTONIC only, so the two drift apart (0.31 s after 3 hours of uptime on
    the test machine); compared with time.monotonic, the deadline passed that much early, and
    followers that heard their leader 50 ms before asked for pre-votes all the time. Once a
    peer lacked a leader (back from isolation) one granted it, and that follower's election
    deposed the working leader. Looked up on the module so tests can skew it."""
    return pso.monotonicTime()


class _AlreadyAppliedFilter(logging.Filter):
    """pysyncobj logs CRITICAL when a follower gets entries it already has. Inside a
    RaftReplica nothing is truncated unless terms conflict (DurableJournal), so it is routine."""

    def filter(self, record):
        if getattr(_handling, "replica", False) and "truncating already-applied" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("pysyncobj").isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("pysyncobj.syncobj").addFilter(_AlreadyAppliedFilter())


class RaftReplica(SyncObj):
    def __init__(self, config: ReplicaConfig):
        config.validate()
        self.config = config
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        self.store = StateStore(os.path.join(config.data_dir, "state"))
        if self.store.discarded_after_os_crash:
            log.warning("replica %s: the OS restarted before its state was synced; rebuilding "
                        "it from the Raft snapshot and journal", config.id)
        self._resolutions: list[tuple[Future, object, int]] = []
        self._barrier_waiters: list[Future] = []
        self._apply_listeners: list[ApplyListener] = []
        self._propose_listeners: list[Callable[[Command], None]] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self._state_replaced = False
        self._applied_batch: list[tuple[int, Command, dict]] = []
        self._sent_log_index = 0
        self._sent_commit_index = 0
        self._commit_hold = Hold()  # a leader's commit index not yet sent (lazy_commit)
        self._forwarded = ForwardedCommands()
        self._apply_hold = Hold()  # a follower's committed entries not yet applied
        self._stopping = False
        self._leader_heard = time.monotonic()  # last AppendEntries of the current term or newer
        self._prevote_term: int | None = None  # the election asked about (see _hold_election)
        self._prevotes: set = set()  # peers that would vote in it
        self._election_allowed = False  # see _SyncObj__raftElectionDeadline
        self._was_leader = False
        self._wake_pending = False  # a wake-up byte is in the pipe, not yet seen by a tick
        self._outbox: dict = {}  # node -> messages queued this tick (see _wrap_transport_send)
        self._acks_queued = False  # the outbox holds an ack: fsync before flushing it
        self.stats = {"snapshots": 0, "snapshot_seconds": 0.0, "snapshot_installs": 0, "slow_ticks": 0}
        self.status: dict = {}
        self._last_role: tuple = ()
        conf = SyncObjConf(
            password=config.cluster_secret,
            autoTick=False,
            appendEntriesUseBatch=True,
            appendEntriesPeriod=config.heartbeat,
            raftMinTimeout=config.election_min,
            raftMaxTimeout=config.election_max,
            connectionTimeout=max(1.0, config.election_max),
            connectionRetryTime=0.3,
            # A leader that hears no majority for an election timeout steps down (etcd's
            # CheckQuorum): at 2 x election_max a leader that could send but not hear (a
            # one-way partition) kept its followers from electing for 1.2 s plus their own
            # timeout, and the majority went > 2 s without a write.
            leaderFallbackTimeout=config.election_max,
            commandsWaitLeader=False,
            dynamicMembershipChange=True,
            journalFile=os.path.join(config.data_dir, "raft.journal"),
            fullDumpFile=os.path.join(config.data_dir, "raft.snapshot"),
            serializer=_written_by_background_serializer,
            deserializer=self._load_snapshot,
            logCompactionMinEntries=config.snapshot_min_entries,
            logCompactionMinTime=config.snapshot_min_seconds,
            tcp_keepalive=(1, 1, 2),
        )
        codec.install()  # cheaper pickling and compression, same wire format
        connection.install()  # one system call per message read
        # pysyncobj builds its journal and its encryptor itself; give it ours.
        with _journal_factory_lock:
            original, pso.createJournal = pso.createJournal, DurableJournal
            original_enc, pso.getEncryptor = pso.getEncryptor, AeadEncryptor
            try:
                super().__init__(config.raft_addr, config.peers, conf)
            finally:
                pso.createJournal, pso.getEncryptor = original, original_enc
        self.journal: DurableJournal = self._SyncObj__raftLog
        self._snapshots = BackgroundSerializer(conf.fullDumpFile, conf.logCompactionBatchSize,
                                               self.store, self._load_snapshot,
                                               self._snapshot_written)
        self._SyncObj__serializer = self._snapshots
        self._snapshot_bytes = _file_size(conf.fullDumpFile)
        self._wrap_transport_send()
        # pysyncobj applies a change as the leader appends it (the entry is added next) and
        # as a follower receives it (it is in the log by then, perhaps with later entries).
        self._removed_peers = RemovedPeerLinks(
            self._SyncObj__transport, lambda: self._log_index() + (1 if self._isLeader() else 0),
            lambda: self._SyncObj__raftLeader)
        self._notifier = PipeNotifier(self._poller)
        # The tick's wait ends its tick, after the holds of this tick began (lazy_commit):
        # bound it there, not when the tick starts.
        poll = self._poller.poll
        self._poller.poll = lambda timeout: poll(self._idle_wait(timeout))
        self.addOnTickCallback(self._after_tick)
        self._tick_ended = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"raft-{config.id}", daemon=True)
        self._thread.start()
        StallWatch(config.id, self._thread, lambda: self._tick_ended, lambda: self._stopping).start()

    # -- the tick loop -----------------------------------------------------------------
    def _run(self) -> None:
        last_tick = time.monotonic()
        while not self._stopping:
            try:
                # Cleared before the tick drains the command queue: a command queued after
                # this point finds the flag down and writes a new wake-up (see _wake).
                self._wake_pending = False
                last_tick = self._after_a_stall(last_tick)
                cpu = time.thread_time()
                self._hold_election()
                self.doTick(self.config.tick)
                self._tick_ended = time.monotonic()
                self._note_slow_tick(last_tick, cpu)
                self._flush_outbox()  # replies produced while handling received messages
                if not self.store.has_room():
                    self._wait_for_room()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    log.exception("raft tick failed")
                    pause(self.config.tick)
                    continue
                self._wait_for_room()
            except Exception:
                log.exception("raft tick failed")
                pause(self.config.tick)
        self.store.commit()

    def _note_slow_tick(self, started: float, cpu_started: float) -> None:
        """A tick longer than half the shortest election timeout lets followers' timers run
        out; say how long, and how much of it this thread ran (the rest it waited: for the
        GIL, a disk, or the scheduler)."""
        wall = time.monotonic() - started
        if wall > self.config.election_min / 2:
            self.stats["slow_ticks"] += 1
            log.warning("replica %s: raft tick took %.0f ms, %.0f ms of it running", self.config.id,
                        wall * 1000, (time.thread_time() - cpu_started) * 1000)

    def _after_a_stall(self, last_tick: float) -> float:
        """A replica whose ticks stopped for an election timeout (SIGSTOP, a stalled host)
        waits one more election timeout before it stands for election itself.

        Its election deadline passed while it was not running, so pysyncobj started an
        election on the first tick after the resume, before the leader elected meanwhile
        could reach it, and its higher term deposed that leader (Raft without pre-vote): a
        resumed old leader cost the healthy majority another election (chaos: a 2.0 s write
        gap after the heal). Waiting lets the current leader's AppendEntries arrive first;
        a delayed election is always safe. A tick may itself wait up to `tick` for messages,
        so only a gap longer than that plus election_min is a stall (with a long `tick`, every
        idle tick looked like one and a lone replica never stood for election). Returns this
        tick's start."""
        now = time.monotonic()
        if now - last_tick > self.config.tick + self.config.election_min:
            self._election_deadline = max(self._election_deadline,
                                          _raft_clock() + self._SyncObj__generateRaftTimeout())
        return now

    def _wait_for_room(self) -> None:
        """Stop replicating while the data directory is full; resume when space returns.

        Without space an entry can be neither stored (journal) nor applied (LMDB: a crash,
        see StateStore.has_room), so the replica stands still like a paused one: the
        others go on without it, and what it acknowledged is in its journal. Meanwhile
        requests waiting on it end as unknown (they may still commit elsewhere) and new
        ones at once as not applied, reason disk_full: a 503, never a false success."""
        log.error("replica %s: no space left in %s; replicating again once there is",
                  self.config.id, self.config.data_dir)
        self._end_waiting_proposals()
        while not self._stopping:
            self._refuse_queued_commands()
            self._publish()
            try:
                self.journal.flush()  # what failed to be written (records, meta), if anything
                if self.store.has_room():
                    break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            pause(ROOM_RETRY)
        log.warning("replica %s: space is back; replicating again", self.config.id)

    def _refuse_queued_commands(self) -> None:
        commands = self._SyncObj__commandsQueue
        while True:
            try:
                _, callback = commands.get_nowait()
            except queue.Empty:
                break
            if callable(callback):  # else (node, id): a follower's, which gives up on a silent leader
                callback(None, DISK_FULL)
        waiters, self._barrier_waiters = self._barrier_waiters, []
        self._resolutions.extend((fut, None, DISK_FULL) for fut in waiters)

    def _hold_election(self) -> None:
        """Pre-vote (Raft thesis 9.6): stand for election only once a majority would vote.

        pysyncobj's follower starts an election, with a higher term, as soon as it has not
        heard a leader for an election timeout. A replica cut off on one side (a one-way
        partition, a paused or isolated one that comes back) did so while the others still
        had a working leader, and its higher term deposed that leader when it could talk
        again: the healthy majority lost writes for 2-3 s after the heal (chaos campaign,
        seed 5, twice). Now, when an election is due, this replica first asks its peers
        whether they would vote in it (a `PREVOTE`, which changes no term and no vote) and
        holds the election; the election runs once a majority said yes.
        A peer says yes only if it has not heard a leader for election_min itself and the
        asker's log is at least as up to date as its own. Unanswered, it asks again after
        PREVOTE_AGAIN heartbeats. The grants say nobody led the peer: they count only until
        this replica hears or becomes a leader (kept, a leader that had asked while its own
        election dragged on stood again the moment it stepped down, seconds later)."""
        others = self._SyncObj__otherNodes
        self._election_allowed = not others  # a lone replica has nobody to ask
        if self._isLeader():
            self._prevote_term = None  # its grants said nobody led; now this replica does
        if self._isLeader() or not others or self._SyncObj__selfNode is None:
            return
        now = _raft_clock()
        if self._election_deadline > now or not self._SyncObj__connectedToAnyone():
            return
        term = self.raftCurrentTerm + 1
        if self._prevote_term == term and len(self._prevotes) + 1 > (len(others) + 1) / 2:
            self._prevote_term = None  # granted: pysyncobj's election goes ahead in this tick
            self._election_allowed = True
            return
        if self._prevote_term != term:
            self._prevote_term, self._prevotes = term, set()
        ask = {"type": PREVOTE, "term": term, "last_log_index": self._SyncObj__getCurrentLogIndex(),
               "last_log_term": self._SyncObj__getCurrentLogTerm()}
        for node in others:
            self._SyncObj__transport.send(node, ask)
        # Ask again soon: peers refuse only while they still hear a leader (election_min),
        # and a full timeout between rounds made every failover that much longer.
        self._election_deadline = now + PREVOTE_AGAIN * self.config.heartbeat

    @property
    def _SyncObj__raftElectionDeadline(self) -> float:
        """pysyncobj's election deadline as pysyncobj sees it: never due unless this tick's
        pre-vote round was granted (_hold_election).

        pysyncobj reads its deadline only where its tick decides to stand for election, a
        moment after _hold_election looked at it. When the deadline passed in between (the
        Raft thread descheduled or waiting for the GIL on a loaded machine), pysyncobj stood
        for election unasked: a replica nobody could hear (a one-way partition) raised its
        term, then ignored the leader's lower-term heartbeats after the heal and was refused
        every pre-vote, out of the cluster for good (chaos: `settled` failed), or its vote
        request deposed that leader. The deadline itself is kept in _election_deadline,
        where pysyncobj's writes (a heartbeat or a vote pushes it on) land."""
        return self._election_deadline if self._election_allowed else math.inf

    @_SyncObj__raftElectionDeadline.setter
    def _SyncObj__raftElectionDeadline(self, deadline: float) -> None:
        self._election_deadline = deadline

    def _on_prevote(self, node, message) -> None:
        if message["type"] == PREVOTE_GRANTED:
            if message["term"] == self._prevote_term and node in self._SyncObj__otherNodes:
                self._prevotes.add(node)
                if len(self._prevotes) + 1 > (len(self._SyncObj__otherNodes) + 1) / 2:
                    self._election_deadline = 0  # the next tick starts the election
            return
        heard = self._isLeader() or (self._SyncObj__raftLeader is not None and
                                     time.monotonic() - self._leader_heard < self.config.election_min)
        mine = (self._SyncObj__getCurrentLogTerm(), self._SyncObj__getCurrentLogIndex())
        if not heard and message["term"] > self.raftCurrentTerm \
                and (message["last_log_term"], message["last_log_index"]) >= mine:
            self._SyncObj__transport.send(node, {"type": PREVOTE_GRANTED, "term": message["term"]})

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        self.destroy()
        self._snapshots.close()
        self.store.close()

    def _wake(self) -> None:
        """Wake the tick thread; one pipe write per tick at most (a syscall per command
        showed up in profiles). Callers queue their work before calling this."""
        if self._wake_pending:
            return  # a byte written since the tick thread last looked will wake it
        self._wake_pending = True
        try:
            self._notifier.notify()
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake already

    def _SyncObj__applyLogEntries(self):
        """Ship first, then apply: pysyncobj's tick applies the newly committed entries, then
        takes queued commands, and only its end (our _after_tick) sends. Taking commands and
        sending the new entries (and a commit index a follower waits on) before applying
        lets followers store and apply in parallel with this replica's apply instead of
        after it (per-stage trace at 64 clients: leader apply to follower apply 3.0 -> 2.2
        ms, a follower-proposed write's time in Raft 11.6 -> 10.0 ms). A follower may hold
        its apply (lazy_commit)."""
        self._checkCommandsToApply()  # a follower forwards them, a leader appends them
        self._ship()
        if not self._apply_now():
            return False
        self._apply_hold.release()
        return SyncObj._SyncObj__applyLogEntries(self)

    def _apply_now(self) -> bool:
        """A follower holds what it learned committed unless its own callers wait on it or
        the hold is due (lazy_commit)."""
        if self._isLeader() or self.raftCommitIndex <= self.raftLastApplied:
            return True
        return bool(self._SyncObj__commandsWaitingCommit) or \
            self._apply_hold.due(time.monotonic())

    def _ship(self) -> None:
        """Send what is new: a leader's entries now, not at the next heartbeat, and its
        commit index to the followers waiting on it, or to all once it is due (see
        lazy_commit); then everything queued for peers (see _flush_outbox)."""
        if self._isLeader():
            commit = self.raftCommitIndex
            new_entries = self._log_index() > self._sent_log_index
            commit_unsent = commit > self._sent_commit_index
            if new_entries or commit_unsent and (
                    not self._SyncObj__otherNodes or self._commit_hold.due(time.monotonic())):
                self._SyncObj__sendAppendEntries()
            elif commit_unsent:
                for node in self._forwarded.committed(commit):
                    self._send_commit_index(node)
        self._flush_outbox()

    def _SyncObj__sendAppendEntries(self):
        """Every AppendEntries (ours, or pysyncobj's heartbeat) carries the commit index."""
        SyncObj._SyncObj__sendAppendEntries(self)
        self._sent_log_index, self._sent_commit_index = self._log_index(), self.raftCommitIndex
        self._commit_hold.release()
        self._forwarded.committed(self._sent_commit_index)

    def _send_commit_index(self, node) -> None:
        """An empty AppendEntries to one follower that holds every entry, for its commit
        index; a follower still missing entries gets them, by the usual path, from all."""
        if node not in self._SyncObj__connectedNodes:
            return  # it learns the commit index from the next AppendEntries it gets
        next_index = self._SyncObj__raftNextIndex.get(node)
        prev_index, prev_term = self._SyncObj__getPrevLogIndexTerm(next_index or 0)
        if next_index is None or next_index <= self._log_index() or prev_index is None:
            self._SyncObj__sendAppendEntries()
            return
        self._SyncObj__transport.send(node, {
            "type": "append_entries", "term": self.raftCurrentTerm,
            "commit_index": self.raftCommitIndex, "entries": [],
            "prevLogIdx": prev_index, "prevLogTerm": prev_term})

    def _idle_wait(self, timeout: float) -> float:
        """How long a tick may wait for messages: held commits bound it (lazy_commit)."""
        if not self._isLeader():
            self._commit_hold.release()
            self._forwarded.clear()  # their commands are answered by a later leader, or fail
        now = time.monotonic()
        waits = [w for w in (self._commit_hold.remaining(now), self._apply_hold.remaining(now))
                 if w is not None]
        return min([timeout] + waits)

    def _after_tick(self) -> None:
        """Runs inside each tick before it waits: replicate, make durable, resolve."""
        leader = self._isLeader()
        if not leader:
            self._give_up_without_leader(stepped_down=self._was_leader)
        self._was_leader = leader
        self._ship()  # what arrived during apply; before the leader's own fsync
        self._propose_barrier()
        self.store.commit()
        self._publish()
        # After answering: what this tick applied was committed on a majority already, and
        # the leader counts its own new entries only from the next tick's commit step.
        self._sync_journal()
        self._removed_peers.drop_committed(self.raftCommitIndex)
        if leader and not self._SyncObj__otherNodes and self._log_index() > self.raftCommitIndex:
            self._wake()  # a single replica: no ack will wake the tick that commits these
        self._refresh_status()

    def _give_up_without_leader(self, stepped_down: bool) -> None:
        """Answer waiting proposals once this replica knows it has no leader to reach.

        pysyncobj keeps a command it appended as leader, or forwarded and had acknowledged
        by a leader, until that log index is applied here, and a follower cut off from
        everyone starts no election, so it keeps a silent leader for good. Clients of a
        replica without a quorum then waited the whole write timeout (or the whole
        partition) for an answer; and pysyncobj forwards a command to a leader it has no
        connection to (a resumed paused replica, before it reconnects) by dropping it. Now a
        leader that is silent for an election timeout, or not connected, is dropped,
        and when there is no leader every waiting proposal ends as unknown (it may still
        commit elsewhere); new ones fail at once with MISSING_LEADER (`no_leader`). So do
        the proposals of a leader that just stepped down (a paused leader resumed into a
        newer term): their entries are overwritten or committed by the new leader only
        when it writes at those indexes, which a quiet cluster may not do for a while."""
        leader = self._SyncObj__raftLeader
        silent = time.monotonic() - self._leader_heard > self.config.election_max
        if leader is not None and (silent or leader not in self._SyncObj__connectedNodes):
            self._SyncObj__raftLeader = None
            self._SyncObj__onLeaderChanged()  # forwarded, not yet acknowledged: LEADER_CHANGED
        if self._SyncObj__raftLeader is None or stepped_down:
            self._end_waiting_proposals()

    def _end_waiting_proposals(self, up_to: float = math.inf) -> None:
        """Proposals waiting for their entry (up to index `up_to`) to commit end as unknown
        (it still may)."""
        waiting = self._SyncObj__commandsWaitingCommit
        for index in sorted(i for i in waiting if i <= up_to):
            for _, callback in waiting.pop(index):
                callback(None, FAIL_REASON.LEADER_CHANGED)

    def _log_index(self) -> int:
        return self.journal[-1][1]

    def _sync_journal(self) -> None:
        if self.config.durability != "fsync":
            self.journal.flush()  # into the page cache: a process crash loses nothing
            return
        self.journal.sync()

    def _wrap_transport_send(self) -> None:
        """Followers fsync before acknowledging entries (the ack is `next_node_idx`), and
        messages are queued per peer until the tick flushes them (_flush_outbox).

        The fsync happens when a flush sends queued acks, once for all the AppendEntries
        handled since the last flush, and before any of them leaves. pysyncobj ignores
        send()'s result (it checks connectivity itself); a message queued for a peer that
        disconnects before the flush is lost like any message in flight, which Raft
        tolerates.
        """
        transport = self._SyncObj__transport
        send = transport.send
        self._send_now = send

        def durable_send(node, message):
            if message.get("type") == "apply_command_response" and "log_idx" in message:
                self._forwarded.add(message["log_idx"], node)  # its client waits on the commit
            elif message.get("type") == "next_node_idx":
                if message.get("success"):
                    self._acks_queued = True
                else:
                    message = rewind_to_commit(message, self.raftCommitIndex)
            if "serialized" in message or "transmission" in message:
                # Snapshot and large-entry chunks: paced by pysyncobj, keep them separate.
                self._flush_outbox()
                return send(node, message)
            self._outbox.setdefault(node, []).append(message)
            return True

        transport.send = durable_send

    def _flush_outbox(self) -> None:
        """Send what this tick queued: one message per peer, a batch when there are several."""
        if not self._outbox:
            return
        if self._acks_queued:  # what they acknowledge must be durable first
            self._sync_journal()
            self._acks_queued = False
        outbox, self._outbox = self._outbox, {}
        for node, messages in outbox.items():
            self._send_now(node, messages[0] if len(messages) == 1 else
                           {"type": BATCH, "messages": messages})

    def _SyncObj__onMessageReceived(self, node, message):
        """Bound a follower's commit index by the last entry this message vouched for.

        DurableJournal keeps entries past the new ones (they may be acknowledged), so the
        log can be longer than what the leader just checked; Raft forbids committing those.
        A batch (see _flush_outbox) is handled as its messages, in order.
        """
        if message.get("type") == BATCH:
            for m in message["messages"]:
                self._SyncObj__onMessageReceived(node, m)
            return
        if message.get("type") in (PREVOTE, PREVOTE_GRANTED):
            return self._on_prevote(node, message)
        if message.get("type") in MEMBERS_ONLY and node not in self._SyncObj__otherNodes:
            return  # a removed peer still linked (removed_peer_links): its vote or ack counts not
        if message.get("type") == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
            self._leader_heard = time.monotonic()
            self._prevote_term = None  # its grants said nobody led (see _hold_election)
        if message.get("type") == "append_entries" and "serialized" in message:
            return self._on_snapshot_chunk(node, message)
        if message.get("type") != "append_entries" or "prevLogIdx" not in message \
                or message.get("transmission") in ("start", "process"):
            return SyncObj._SyncObj__onMessageReceived(self, node, message)
        before = self.raftCommitIndex
        entries = message.get("entries") or []
        if message.get("transmission") == "finish":  # one large entry sent in chunks
            last_new = message["prevLogIdx"] + 1
        else:
            last_new = entries[-1][1] if entries else message["prevLogIdx"]
        prev = self._SyncObj__getEntries(message["prevLogIdx"], 1)
        accepted = bool(prev) and prev[0][2] == message["prevLogTerm"] and \
            message["term"] >= self.raftCurrentTerm
        _handling.replica = True
        try:
            SyncObj._SyncObj__onMessageReceived(self, node, message)
        finally:
            _handling.replica = False
        if not accepted:
            return
        bound = max(before, min(message["commit_index"], last_new))
        if self.raftCommitIndex > bound:
            self._SyncObj__raftCommitIndex = bound
            self.journal.setRaftCommitIndex(bound)
        if not entries and self.raftCommitIndex > before:
            self._apply_hold.expire()  # it came alone: the leader held it already (lazy_commit)
        self._redo_membership_after(last_new)

    def _on_snapshot_chunk(self, node, message) -> None:
        """A snapshot chunk commits nothing of this replica's log until the snapshot is
        installed.

        pysyncobj set the commit index to min(leader's commit, own last entry) on every
        chunk, with no log matching: a deposed leader far enough behind to be sent a
        snapshot applied its own uncommitted entries and answered their clients with
        success (chaos campaign, seed 77: a 201 for a write no majority stored, after a
        SIGSTOP of the leader). An installed snapshot replaces the log with the leader's
        committed state, so pysyncobj's commit index is right then; proposals waiting on
        an entry the snapshot covers can no longer be told apart and end as unknown."""
        before, installs = self.raftCommitIndex, self.stats["snapshot_installs"]
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if self.stats["snapshot_installs"] != installs:
            self._end_waiting_proposals(up_to=self.raftLastApplied)
        elif self.raftCommitIndex != before:
            self._SyncObj__raftCommitIndex = before
            self.journal.setRaftCommitIndex(before)

    def _redo_membership_after(self, last_new: int) -> None:
        """pysyncobj rolled back membership changes for every entry after prevLogIdx and
        redid them only for the new entries; redo them for the tail the journal kept."""
        first = self.journal[0][1]
        for command, idx, _ in self.journal[max(0, last_new + 1 - first):]:
            request = self._SyncObj__parseChangeClusterRequest(command)
            if request is not None:
                self._SyncObj__doChangeCluster(request)

    # -- state machine -------------------------------------------------------------------
    @replicated
    def apply_command(self, payload: bytes):
        index = self.raftLastApplied + 1  # pysyncobj applies entries in order
        if index <= self.store.writer_version():
            return None  # replay after restart: already in LMDB
        result, published = apply_entry(self.store, payload, index)
        self._applied_batch.extend(published)
        return result

    def add_apply_listener(self, fn: Callable[[list], None],
                           loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`fn(batch)` runs after each committed LMDB batch, before the batch's futures
        resolve: on the Raft thread, or with `loop` on that loop (applied.deliver)."""
        self._apply_listeners.append((fn, loop))

    def add_reset_listener(self, fn: Callable[[], None]) -> None:
        """`fn()` runs on the Raft thread after a snapshot replaced the whole state: commands
        were skipped, so anything derived from applied batches must be rebuilt."""
        self._reset_listeners.append(fn)

    def _publish(self) -> None:
        if self._state_replaced:
            self._state_replaced, self._applied_batch = False, []
            for fn in self._reset_listeners:
                try:
                    fn()
                except Exception:
                    log.exception("reset listener failed")
        batch, self._applied_batch = self._applied_batch, []
        resolutions, self._resolutions = self._resolutions, []
        deliver(batch, self._apply_listeners,
                [(fut, _outcome(result, err)) for fut, result, err in resolutions])

    # -- proposing -------------------------------------------------------------------------
    def propose(self, cmd: Command) -> Future:
        """Submit through Raft from any thread; the future yields an Outcome.

        A caller that gives up waiting must report the outcome as unknown: the entry may
        still commit later.
        """
        fut: Future = Future()
        self._proposing(cmd)
        self.apply_command(cmd.encode(), callback=lambda res, err: self._resolutions.append((fut, res, err)))
        self._wake()
        return fut

    def propose_async(self, cmd: Command) -> asyncio.Future:
        """propose() for a caller on an asyncio loop: the future is settled on its loop,
        together with the others this tick resolved, instead of one thread-safe wake-up
        (and a concurrent Future bridged with wrap_future) per command. Same Outcome rules."""
        fut = asyncio.get_running_loop().create_future()
        self._proposing(cmd)
        self.apply_command(cmd.encode(), callback=lambda res, err: self._resolutions.append((fut, res, err)))
        self._wake()
        return fut

    def add_propose_listener(self, fn: Callable[[Command], None]) -> None:
        self._propose_listeners.append(fn)

    def _proposing(self, cmd: Command) -> None:
        for fn in self._propose_listeners:
            fn(cmd)

    def barrier(self) -> Future:
        """A future that completes once everything committed before this call is applied here."""
        fut: Future = Future()
        self._barrier_waiters.append(fut)
        self._wake()
        return fut

    def _propose_barrier(self) -> None:
        if not self._barrier_waiters:
            return
        waiters, self._barrier_waiters = self._barrier_waiters, []

        def done(res, err):
            for fut in waiters:
                self._resolutions.append((fut, res, err))

        self.apply_command(Barrier().encode(), callback=done)
        self._wake()

    # -- membership -----------------------------------------------------------------------
    def change_membership(self, action: str, raft_addr: str) -> Future:
        fut: Future = Future()
        cb = lambda res, err: self._resolutions.append((fut, res, err))
        node = pso.TCPNode(raft_addr)
        if action == "add":
            self.addNodeToCluster(node, callback=cb)
        else:
            self.removeNodeFromCluster(node, callback=cb)
        self._wake()
        return fut

    # -- snapshots ------------------------------------------------------------------------
    def request_snapshot(self) -> None:
        """The next tick snapshots and compacts the log, whatever its size."""
        self.forceLogCompaction()
        self._wake()

    def _snapshot_written(self, seconds: float) -> None:
        self.stats["snapshots"] += 1
        self.stats["snapshot_seconds"] += seconds
        self._snapshot_bytes = _file_size(self._SyncObj__conf.fullDumpFile)

    def _SyncObj__tryLogCompaction(self):
        """pysyncobj snapshots as soon as the journal has snapshot_min_entries entries. A
        snapshot copies the whole state, so for a large state written fast that was a copy
        every second or so (23 MB every 1.25 s on each replica at 4,000 writes/s, ~6% of
        the replicas' CPU). The journal must now also hold SNAPSHOT_JOURNAL_SHARE of the
        last snapshot's bytes (each byte written is then copied at most twice), or
        SNAPSHOT_MAX_ENTRIES entries; time-based and forced snapshots are unchanged."""
        conf, entries = self._SyncObj__conf, len(self.journal)
        big_enough = self.journal.size() >= self._snapshot_bytes * SNAPSHOT_JOURNAL_SHARE
        conf.logCompactionMinEntries = self.config.snapshot_min_entries \
            if big_enough or entries >= SNAPSHOT_MAX_ENTRIES \
            else max(entries, self.config.snapshot_min_entries)
        return SyncObj._SyncObj__tryLogCompaction(self)

    def _load_snapshot(self, path: str):
        self._snapshots.wait()  # a write in progress pins the state about to be replaced
        self.stats["snapshot_installs"] += 1
        self._snapshot_bytes = _file_size(path)
        last, prev, members = snapshot.load_snapshot(self.store, path)
        self._state_replaced = True
        # Node objects, not address strings: pysyncobj compares members with its own
        # TCPNode, and a string self would be counted as a second member.
        return last, prev, [pso.TCPNode(m) for m in members]

    # -- status -----------------------------------------------------------------------------
    def _refresh_status(self) -> None:
        """A copy taken on the Raft thread, so API threads never read pysyncobj mid-change."""
        leader = self._getLeader()
        self.status = {
            "id": self.config.id,
            "raft_addr": self.config.raft_addr,
            "state": RAFT_STATES.get(self._SyncObj__raftState, "unknown"),
            "leader": leader.id if leader is not None else None,
            "term": self.raftCurrentTerm,
            "commit_index": self.raftCommitIndex,
            "applied_index": self.raftLastApplied,
            "log_entries": len(self.journal),
            "has_quorum": self.hasQuorum,
            "members": sorted([self.config.raft_addr] + [n.id for n in self._SyncObj__otherNodes]),
            "leader_commit_index": self._SyncObj__leaderCommitIndex,
            "journal_syncs": self.journal.syncs,
            "leader_heard": self._leader_heard if leader is not None else None,  # monotonic
        }
        self._log_role_change()

    def _log_role_change(self) -> None:
        """One line per change of role, term or leader: the replica logs then show who led
        when, which a fault timeline or an operator reading an outage needs."""
        role = (self.status["state"], self.status["term"], self.status["leader"])
        if role != self._last_role:
            self._last_role = role
            log.info("replica %s: %s in term %d, leader %s", self.config.id, role[0], role[1],
                     role[2] or "unknown")


def rewind_to_commit(reply: dict, commit_index: int) -> dict:
    """A follower's rejection of AppendEntries asks the leader to resend from just after
    its commit index, never from further on.

    pysyncobj's follower answers a term mismatch at prevLogIdx with "resend from
    prevLogIdx" (one entry back per round trip) and an AppendEntries beyond its log with
    "resend from my last + 1", while its leader advances nextIndex optimistically with
    every AppendEntries it sends. A follower holding several uncommitted entries of an
    old term (a leader that was cut off while it still took writes) could then livelock
    under load: each one-step rewind was overwritten by a "last + 1" answer to an
    AppendEntries already in flight, and it never caught up (seen in the chaos test, a
    replica 454 entries behind for good). Everything up to the commit index matches every
    later leader's log, so resending from there always succeeds in one round trip, and
    every rejection names the same point; entries the follower already has with the same
    term are skipped by DurableJournal.add, the conflicting ones replaced."""
    if not reply.get("reset") or reply.get("next_node_idx", 0) <= commit_index + 1:
        return reply
    return dict(reply, next_node_idx=commit_index + 1)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _written_by_background_serializer(path, raft_data):
    """pysyncobj's conf needs a serializer, or it pickles the whole object for a snapshot;
    the one it calls is BackgroundSerializer, installed after its __init__."""
    raise AssertionError("snapshots are written by BackgroundSerializer")


def _outcome(result, err: int) -> Outcome:
    if err == FAIL_REASON.SUCCESS:
        return Outcome(Outcome.APPLIED, result)
    if err in NOT_APPLIED:
        return Outcome(Outcome.NOT_APPLIED, reason=_reason(err))
    return Outcome(Outcome.UNKNOWN, reason=_reason(err))


def _reason(err: int) -> str:
    names = {v: k.lower() for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}
    names[DISK_FULL] = "disk_full"
    return names.get(err, str(err))
