"""Carries out a fault schedule (chaos/schedule.py) against real replica processes.

Runs in its own thread beside the asyncio workload. Symbolic targets ("leader",
"follower:K") are resolved when a fault starts and the resolution is written to the
timeline, so a report says exactly which replica was hit. Every fault is undone at the end
of its window (`heal`), and `heal_all` undoes anything left (an aborted run) idempotently.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import urllib.error
from dataclasses import dataclass, field

from raftmesh.lab.local_cluster import LocalCluster, ReplicaProcess
from raftmesh.lab import latency_proxy
from raftmesh.lab.power import PowerLossDisk, power_cut

from . import clock
from raftmesh.lab.replica_net import NetRules, ReplicaNet
from .schedule import FaultEvent, blocked_pairs

FILLER = "chaos-diskfull-filler"  # in a replica's data directory (diskfull faults)


@dataclass
class TimelineEntry:
    index: int
    kind: str
    target: str  # as resolved
    detail: str
    start: float
    end: float | None = None
    params: dict = field(default_factory=dict)
    leader: str | None = None  # who led when the fault started (availability depends on it)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(vars(self))


class Injector:
    def __init__(self, cluster: LocalCluster, net: ReplicaNet, schedule: list[FaultEvent], t0: float,
                 proxies: dict[int, tuple[str, int]] | None = None, log=print,
                 disks: dict[str, PowerLossDisk] | None = None):
        self.cluster, self.net, self.schedule, self.t0 = cluster, net, schedule, t0
        self.proxies = proxies or {}  # replica index -> control address of its latency proxy
        self.disks = disks or {}  # replica id -> its power-loss disk (powercut runs)
        self.log = log
        self.timeline: list[TimelineEntry] = []
        self.current: TimelineEntry | None = None
        self.stop = threading.Event()
        self.errors: list[str] = []
        self._killed: set[str] = set()
        self._paused: set[str] = set()
        self._removed: dict[str, bool] = {}  # id -> stopped and set aside, awaiting re-add
        self._filled: set[str] = set()  # filler files of diskfull faults
        self._removals = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def ids(self) -> list[str]:
        return [r.id for r in self.cluster.replicas]

    def replica(self, rid: str) -> ReplicaProcess:
        return next(r for r in self.cluster.replicas if r.id == rid)

    def index(self, rid: str) -> int:
        return self.ids().index(rid)

    # -- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            for ev in self.schedule:
                ready = self._ready_by(self.t0 + ev.start)
                if self.stop.wait(max(0.0, self.t0 + ev.start - time.monotonic())):
                    return
                entry = self._inject(ev)
                entry.params["all_ready_at_start"] = ready
                if not ready:
                    entry.notes.append("not every replica was ready when this fault started")
                self.stop.wait(max(0.0, self.t0 + ev.end - time.monotonic()))
                self._heal(ev, entry)
                if self.stop.is_set():
                    return
        except Exception as e:  # the run must still heal and report
            self.errors.append(f"injector: {e!r}")
            self.log(f"injector error: {e!r}")

    # -- leader and targets -------------------------------------------------------------------
    def leader(self) -> str | None:
        best = None
        for r in self.cluster.replicas:
            if not r.alive() or r.id in self._paused:
                continue
            try:
                status, body = self.cluster.request(r, "GET", "/api/v1/cluster/self", timeout=1)
            except (OSError, urllib.error.URLError):
                continue
            if status == 200 and body["replica"]["state"] == "leader":
                term = body["replica"]["term"]
                if best is None or term > best[0]:
                    best = (term, r.id)
        return best[1] if best else None

    def resolve(self, target: str) -> tuple[str, str]:
        """(replica id, how it was chosen)."""
        if target == "leader":
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                lead = self.leader()
                if lead:
                    return lead, "the leader"
                time.sleep(0.1)
            return self.ids()[0], "no leader found, first replica instead"
        if target.startswith("follower:"):
            lead = self.leader()
            followers = [i for i in self.ids() if i != lead]
            pick = followers[int(target.split(":")[1]) % len(followers)]
            return pick, f"follower #{target.split(':')[1]} (leader was {lead})"
        return target, "scheduled"

    # -- inject / heal --------------------------------------------------------------------------
    def _inject(self, ev: FaultEvent) -> TimelineEntry:
        target, how = ("all", "scheduled") if ev.target in ("all", "") else self.resolve(ev.target)
        entry = TimelineEntry(ev.index, ev.kind, target, "", self.now(), params=dict(ev.params),
                              leader=target if how == "the leader" else self.leader())
        self.current = entry
        self.timeline.append(entry)
        getattr(self, f"_start_{ev.kind}")(ev, entry, target)
        entry.detail = entry.detail or f"{ev.kind} {target}"
        if how != "scheduled":
            entry.notes.append(f"target {target}: {how}")
        self.log(f"fault #{ev.index} {entry.detail}")
        return entry

    def _heal(self, ev: FaultEvent, entry: TimelineEntry) -> None:
        getattr(self, f"_end_{ev.kind}")(ev, entry)
        entry.end = self.now()
        self.current = None
        self.log(f"healed #{ev.index} {ev.kind} after {entry.end - entry.start:.1f}s")

    def _ready_by(self, when: float) -> bool:
        """Whether every replica is ready by `when` (monotonic), waiting for it no longer:
        the schedule keeps its times. A restarted Python process took over 3 s on a loaded
        machine, so a window could begin with a replica it does not target still down; such
        a window is not a single-replica fault and is not judged for availability."""
        try:
            self.cluster.wait_ready(timeout=max(0.0, when - time.monotonic()))
            return True
        except (TimeoutError, RuntimeError):
            return False

    def _start_kill(self, ev, entry, rid):
        self.cluster.kill(self.replica(rid), signal.SIGKILL)
        self._killed.add(rid)
        entry.detail = f"SIGKILL {rid}"

    def _end_kill(self, ev, entry):
        self._restart_killed()

    def _restart_killed(self):
        for rid in sorted(self._killed):
            r = self.replica(rid)
            if not r.alive():
                self.cluster.start(r)
        self._killed.clear()

    def _start_powercut(self, ev, entry, rid):
        rids = self.ids() if rid == "all" else [rid]
        seed = ev.params["seed"] if ev.params["torn"] else None
        lost = power_cut([(self.disks[i], self.replica(i).proc) for i in rids], torn_seed=seed)
        self._killed.update(rids)
        entry.detail = f"power cut {'of every replica' if rid == 'all' else rid}" + (
            ", unsynced writes torn" if seed is not None else "")
        for i, report in zip(rids, lost):
            entry.notes.append(f"{i} lost {report['writes_lost']} unsynced writes, "
                               f"{report['entries_restored']} directory entries undone")

    def _end_powercut(self, ev, entry):
        self._restart_killed()  # the power is back

    def _start_diskfull(self, ev, entry, rid):
        path = os.path.join(self.replica(rid).data_dir, FILLER)
        free = os.statvfs(os.path.dirname(path))
        size = free.f_bavail * free.f_frsize
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        self._filled.add(path)
        entry.detail = f"fill {rid}'s data directory: {size >> 20} MB were free, now none"

    def _end_diskfull(self, ev, entry):
        self._empty_filled()

    def _empty_filled(self):
        for path in sorted(self._filled):
            os.unlink(path)
        self._filled.clear()

    def _start_pause(self, ev, entry, rid):
        r = self.replica(rid)
        if r.alive():
            r.proc.send_signal(signal.SIGSTOP)
            self._paused.add(rid)
        entry.detail = f"SIGSTOP {rid}"

    def _end_pause(self, ev, entry):
        self._resume_paused()

    def _resume_paused(self):
        for rid in sorted(self._paused):
            r = self.replica(rid)
            if r.alive():
                r.proc.send_signal(signal.SIGCONT)
        self._paused.clear()

    def _start_partition(self, ev, entry, rid):
        ids = self.ids()
        pairs = blocked_pairs(ev.params, rid, ids)
        ip = {r: self.net.ips[i] for i, r in enumerate(ids)}
        for i, r in enumerate(ids):
            blocked = {ip[o] for p in pairs if r in p for o in p if o != r}
            self.net.set_rules(i, NetRules(blocked=blocked))
        mode = ev.params["mode"]
        if mode in ("isolate-one", "isolate-leader"):
            entry.detail = f"partition ({mode}): {rid} | {', '.join(o for o in ids if o != rid)}"
        elif mode == "halves":
            entry.detail = f"partition (halves): {', '.join(ev.params['minority'])} | {', '.join(ev.params['majority'])}"
        else:
            entry.detail = (f"partition (bridge): {', '.join(ev.params['left'])} | {', '.join(ev.params['right'])}, "
                            f"{rid} sees both")

    def _end_partition(self, ev, entry):
        self.net.heal()

    def _start_loss(self, ev, entry, rid):
        permille = ev.params["percent"] * 10
        if rid == "all":
            for i in range(len(self.ids())):
                self.net.set_rules(i, NetRules(loss_in=permille))
        else:
            self.net.set_rules(self.index(rid), NetRules(loss_in=permille, loss_out=permille))
        entry.detail = f"packet loss {ev.params['percent']}% on {'all links' if rid == 'all' else rid + ' links'}"

    def _end_loss(self, ev, entry):
        self.net.heal()

    def _start_latency(self, ev, entry, rid):
        d, j = ev.params["delay_ms"], ev.params["jitter_ms"]
        if not self.proxies:
            entry.notes.append("no latency proxies (latency not in --faults at start-up)")
            return
        for i, control in self.proxies.items():
            if rid == "all" or self.ids()[i] == rid:
                self._proxy(control, f"set * {d} {j}")
            else:
                self._proxy(control, f"set {self.net.ips[self.index(rid)]} {d} {j}")
        entry.detail = f"latency {d}±{j} ms one way on {'all links' if rid == 'all' else rid + ' links'}"

    def _end_latency(self, ev, entry):
        for control in self.proxies.values():
            self._proxy(control, "clear")

    def _start_oneway(self, ev, entry, rid):
        i, ips = self.index(rid), self.net.ips
        others = {ip for j, ip in enumerate(ips) if j != i}
        if ev.params["drop"] == "in":
            self.net.set_rules(i, NetRules(deaf_to=others))
            entry.detail = f"one-way partition: {rid} hears nobody (its own packets flow)"
        else:
            for j in range(len(ips)):
                if j != i:
                    self.net.set_rules(j, NetRules(deaf_to={ips[i]}))
            entry.detail = f"one-way partition: nobody hears {rid} (it hears the others)"

    def _end_oneway(self, ev, entry):
        self.net.heal()

    def _start_clock(self, ev, entry, rid):
        seconds = ev.params["seconds"]
        clock.set_offset(clock.control_file(self.cluster.log_dir, rid), seconds)
        entry.detail = f"clock {ev.params['mode']} {seconds:+d}s on {rid}"

    def _end_clock(self, ev, entry):
        for rid in self.ids():
            clock.set_offset(clock.control_file(self.cluster.log_dir, rid), 0)

    def _start_crash(self, ev, entry, rid):
        lead = self.leader()
        if lead is None or lead == rid:
            entry.detail = f"crash: no leader apart from {rid} to kill mid-change; nothing done"
            return
        answers = []
        call = threading.Thread(target=lambda: answers.append(self._request_quietly(
            self.replica(lead), "DELETE", f"/api/v1/cluster/members/{rid}")))
        call.start()
        self.stop.wait(ev.params["delay_ms"] / 1000)  # into the change, not before it
        self.cluster.kill(self.replica(lead), signal.SIGKILL)
        self._killed.add(lead)
        call.join(10)
        entry.detail = f"SIGKILL leader {lead} {ev.params['delay_ms']} ms into removing {rid}"
        entry.notes.append(f"DELETE /cluster/members/{rid} via {lead} -> {answers[0] if answers else 'no answer'}")
        entry.params["crashed"], entry.params["member"] = lead, rid

    def _end_crash(self, ev, entry):
        self._restart_killed()
        rid = entry.params.get("member")
        if rid is None:
            return
        if self._is_member(rid):  # did the removal go through? (unknown: assume it did)
            entry.notes.append(f"{rid} is still a member")
            return
        entry.notes.append(f"{rid} was removed: re-adding it fresh")
        self._stop_removed(rid)
        self._readd_removed(entry)

    def _is_member(self, rid: str, timeout: float = 20) -> bool | None:
        """Whether the leader counts `rid` as a member (None: no leader confirmed in time).

        A removal the leader appended may not have committed and may yet be rolled back;
        setting a member's data aside could then lose committed writes. So "not a member"
        holds only once a read barrier (a log entry) has committed on that same leader in
        the same term, after the removal in its log."""
        addr, deadline = self.replica(rid).raft_addr, time.monotonic() + timeout
        while time.monotonic() < deadline:
            lead = self.leader()
            before = self._leader_status(lead) if lead else None
            if before is not None and addr in before["members"]:
                return True
            if before is not None and self._request_quietly(
                    self.replica(lead), "GET", "/api/v1/cluster/members")[0] == 200:
                after = self._leader_status(lead)
                if after is not None and after["term"] == before["term"]:
                    return addr in after["members"]
            time.sleep(0.3)
        return None

    def _leader_status(self, rid: str) -> dict | None:
        status, own = self._request_quietly(self.replica(rid), "GET", "/api/v1/cluster/self")
        return own["replica"] if status == 200 and own["replica"]["state"] == "leader" else None

    def _request_quietly(self, r, method, path):
        try:
            return self.cluster.request(r, method, path, timeout=6)
        except (OSError, urllib.error.URLError) as e:
            return None, repr(e)

    def _proxy(self, control, line):
        answer = latency_proxy.send(control, line)
        if answer != "ok":
            raise RuntimeError(f"latency proxy {control}: {line!r} -> {answer!r}")

    def _start_membership(self, ev, entry, rid):
        deadline = time.monotonic() + max(2.0, ev.duration * 0.6)
        answer = self._until(deadline, lambda via: self.cluster.request(
            via, "DELETE", f"/api/v1/cluster/members/{rid}", timeout=6), rid, ok=(200, 404))
        entry.detail = f"remove {rid} from the cluster"
        if answer is None:
            entry.notes.append(f"removal of {rid} not confirmed in time; left running")
            entry.params["unconfirmed"] = rid
            return
        entry.notes.append(f"DELETE /cluster/members/{rid} -> {answer[0]}")
        entry.notes.append(f"{rid} stopped, {self._stop_removed(rid)}")

    def _stop_removed(self, rid: str) -> str:
        """Stop a removed replica and set its data aside so that it is re-added fresh (by
        `_readd_removed`, even if this fails). A replica re-added fresh and killed before it
        created its data directory has nothing to set aside (chaos seeds 7 and 53: the rename
        raised, the injector failed and the replica was never re-added)."""
        self._removed[rid] = True
        r = self.replica(rid)
        self.cluster.kill(r, signal.SIGTERM)
        self._removals += 1
        aside = f"{r.data_dir}.removed{self._removals}"
        if rid in self.disks:  # the data directory is a mount point: set the disk aside
            self.disks[rid].set_aside(aside)
            return f"its data set aside in {aside}"
        try:
            os.rename(r.data_dir, aside)
        except FileNotFoundError:
            return "it had no data directory yet"
        return f"its data set aside in {aside}"

    def _end_membership(self, ev, entry):
        """A removal not confirmed in time may still commit (chaos seed 8: the replica, left
        running outside the cluster, never became ready); then it is re-added fresh too."""
        rid = entry.params.get("unconfirmed")
        if rid is not None and self._is_member(rid) is False:
            entry.notes.append(f"{rid} was removed after all: re-adding it fresh")
            self._stop_removed(rid)
        self._readd_removed(entry)

    def _readd_removed(self, entry: TimelineEntry | None):
        for rid in sorted(self._removed):
            r = self.replica(rid)
            if not r.alive():
                self.cluster.start(r, join=True)
            body = {"id": r.id, "raft_addr": r.raft_addr, "api_url": r.api_url}
            answer = self._until(time.monotonic() + 20, lambda via: self._added(via, body), rid, ok=(201, 409))
            note = f"re-add {rid}: {answer[0] if answer else 'not confirmed within 20 s'}"
            if entry is not None:
                entry.notes.append(note)
            if answer is None:
                self.errors.append(note)
        self._removed.clear()

    def _added(self, via: ReplicaProcess, body: dict):
        """Done on 201, or on `already_member` once the leader confirms it (the replica asked
        may count an appended change that a new leader then overwrote); any other answer,
        `membership_change_in_progress` among them, is retried."""
        status, answer = self.cluster.request(via, "POST", "/api/v1/cluster/members", body, timeout=6)
        if status == 409:
            if not isinstance(answer, dict) or answer.get("error", {}).get("code") != "already_member":
                return None, answer
            lead = self.leader()
            code, own = self.cluster.request(self.replica(lead), "GET", "/api/v1/cluster/self",
                                             timeout=2) if lead else (None, None)
            if code != 200 or body["raft_addr"] not in own["replica"]["members"]:
                return None, answer  # not confirmed: try again
        return status, answer

    def _until(self, deadline, call, avoid, ok):
        """Send an admin call to live replicas other than `avoid` until one of `ok` answers."""
        while time.monotonic() < deadline:
            lead = self.leader()
            order = sorted((r for r in self.cluster.replicas if r.alive() and r.id != avoid),
                           key=lambda r: r.id != lead)
            for via in order:
                try:
                    status, body = call(via)
                except (OSError, urllib.error.URLError):
                    continue
                if status in ok:
                    return status, body
            time.sleep(0.3)
        return None

    def heal_all(self) -> None:
        """Undo every fault still in force (idempotent); used at the end and on abort."""
        self._resume_paused()
        self._empty_filled()
        self._restart_killed()
        self.net.heal()
        for control in self.proxies.values():
            try:
                self._proxy(control, "clear")
            except OSError:
                pass
        if self._removed:
            self._readd_removed(None)


def clear_removed_data(cluster: LocalCluster) -> None:
    """Data set aside by membership faults is evidence only while a run fails."""
    for r in cluster.replicas:
        parent = os.path.dirname(r.data_dir)
        for name in os.listdir(parent):
            if name.startswith(os.path.basename(r.data_dir) + ".removed"):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
