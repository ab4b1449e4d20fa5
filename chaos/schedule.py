"""The fault schedule: a pure function of (seed, duration, faults, replicas).

Why pure: a failing run is only useful if it can be replayed. The schedule names targets
symbolically ("leader", "follower:1", "r2") and the injector resolves them at run time, so
the same seed always gives the same schedule even though leadership differs between runs.

Faults never overlap: each one gets a slot, takes the first 45-65% of it and the rest is
left for recovery, so a failed check can be pinned to one fault window.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

FAULTS = ("kill", "pause", "partition", "loss", "latency", "membership", "oneway", "clock", "crash")
# Only when asked for: powercut needs FUSE (replicas run slower on it), diskfull puts every
# data directory on a small tmpfs.
OPTIONAL_FAULTS = ("powercut", "diskfull")
FAULT_HELP = {
    "kill": "SIGKILL a replica (the leader or a random one), restart it when the window ends",
    "pause": "SIGSTOP a replica (the leader or a random one), SIGCONT when the window ends",
    "partition": "nftables drops between replicas: isolate one, isolate the leader, "
                 "minority/majority halves, or a bridge (two halves that both see one node)",
    "loss": "nftables drops a random share (5-30%) of Raft packets of one replica or all",
    "latency": "a user-space proxy in front of every Raft port delays bytes (50-250 ms "
               "one way, with jitter) on one replica's links or on all links",
    "membership": "remove a follower from the cluster, stop it and set its data aside, "
                  "then re-add it as a fresh replica when the window ends",
    "powercut": "power loss (not in the default set): every replica's data directory is a "
                "filesystem that forgets what was not fsynced; cut one replica (the leader or "
                "a random one) or all at once, sometimes tearing unsynced writes, and power "
                "them back when the window ends (docs/durability.md, section 9)",
    "oneway": "nftables drops what one replica (the leader or a random one) receives from "
              "the others, or what the others receive from it; the other direction flows",
    "clock": "libfaketime moves one replica's wall clock: skew by 2-30 s or a jump of 5 min "
             "to a day, forward or back (its monotonic clock is left alone)",
    "crash": "SIGKILL the leader while it removes a follower from the cluster; restart it, "
             "and re-add the follower fresh if the removal went through",
    "diskfull": "a full disk (not in the default set): every replica's data directory is a "
                "small tmpfs; a file takes every free block of one replica's (the leader or a "
                "random one), so its writes fail with ENOSPC; the file goes when the window ends",
}
CLOCK_SKEW = (2, 30)  # seconds
CLOCK_JUMP = (300, 86400)
PARTITION_MODES = ("isolate-one", "isolate-leader", "halves", "bridge")
WARMUP = 3.0  # seconds of fault-free workload first: a baseline for the plot
MIN_SLOT = 4.0  # a fault window plus its recovery cannot be shorter than this
TARGET_SLOT = 8.0


@dataclass(frozen=True)
class FaultEvent:
    index: int
    kind: str
    start: float  # seconds after the workload starts
    duration: float
    target: str  # "leader", "follower:K", "rN", "all" or "" (partitions use params)
    params: dict = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.start + self.duration

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"#{self.index} {self.kind} {self.target} {extra}".strip()

    def to_dict(self) -> dict:
        return asdict(self)


def make_schedule(seed: int, duration: float, faults: list[str] | tuple[str, ...],
                  replicas: int) -> list[FaultEvent]:
    """Fault windows covering every requested kind at least once, in a seeded order."""
    faults = sorted(set(faults))
    unknown = [f for f in faults if f not in FAULTS + OPTIONAL_FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS + OPTIONAL_FAULTS)}")
    if replicas < 3:
        raise ValueError("chaos needs at least 3 replicas (a cluster that survives one fault)")
    if not faults:
        return []
    usable = duration - WARMUP
    if usable < MIN_SLOT * len(faults):
        raise ValueError(f"--duration {duration:g}s is too short for {len(faults)} fault type(s): "
                         f"need at least {WARMUP + MIN_SLOT * len(faults):g}s")
    rng = random.Random(f"raftmesh-chaos:{seed}:{duration!r}:{','.join(faults)}:{replicas}")
    n = max(len(faults), int(usable // TARGET_SLOT))
    first = list(faults)
    rng.shuffle(first)
    kinds = first + [rng.choice(faults) for _ in range(n - len(faults))]
    ids = [f"r{i}" for i in range(1, replicas + 1)]
    # Rotate variants; power cuts start with all replicas at once (the worst case) so that
    # even a short run has it.
    counters = {k: 0 if k == "powercut" else rng.randrange(len(PARTITION_MODES)) for k in faults}
    slot = usable / n
    events = []
    for i, kind in enumerate(kinds):
        length = round(slot * rng.uniform(0.45, 0.65), 3)
        start = round(WARMUP + i * slot + rng.uniform(0, slot * 0.1), 3)
        variant = counters[kind]
        counters[kind] += 1
        target, params = _shape(kind, variant, rng, ids)
        events.append(FaultEvent(i, kind, start, length, target, params))
    return events


def _shape(kind: str, variant: int, rng: random.Random, ids: list[str]) -> tuple[str, dict]:
    if kind in ("kill", "pause", "diskfull"):
        return ("leader" if variant % 2 == 0 else rng.choice(ids)), {}
    if kind == "partition":
        mode = PARTITION_MODES[variant % len(PARTITION_MODES)]
        order = list(ids)
        rng.shuffle(order)
        if mode == "isolate-one":
            return order[0], {"mode": mode}
        if mode == "isolate-leader":
            return "leader", {"mode": mode}
        if mode == "halves":
            k = len(ids) // 2
            return "", {"mode": mode, "minority": sorted(order[:k]), "majority": sorted(order[k:])}
        k = (len(ids) - 1) // 2
        return order[k], {"mode": mode, "left": sorted(order[:k]), "right": sorted(order[k + 1:])}
    if kind == "loss":
        return ("all" if variant % 2 == 0 else rng.choice(ids)), {"percent": rng.randint(5, 30)}
    if kind == "latency":
        delay = rng.randint(50, 250)
        return ("all" if variant % 2 else rng.choice(ids)), {"delay_ms": delay, "jitter_ms": delay // 4}
    if kind == "membership":
        return f"follower:{rng.randrange(len(ids) - 1)}", {}
    if kind == "powercut":
        target = ("all", "leader", rng.choice(ids))[variant % 3]
        return target, {"torn": variant % 2 == 1, "seed": rng.randrange(1 << 30)}
    if kind == "oneway":
        return ("leader" if variant % 2 == 0 else rng.choice(ids)), {"drop": ("in", "out")[variant // 2 % 2]}
    if kind == "crash":
        return f"follower:{rng.randrange(len(ids) - 1)}", {"mode": "leader-mid-membership",
                                                            "delay_ms": rng.randint(0, 50)}
    if kind == "clock":
        mode = ("skew", "jump")[variant % 2]
        low, high = CLOCK_SKEW if mode == "skew" else CLOCK_JUMP
        return rng.choice(ids), {"mode": mode, "seconds": rng.choice((-1, 1)) * rng.randint(low, high)}
    raise ValueError(kind)


def blocked_pairs(params: dict, target: str, ids: list[str]) -> set[frozenset]:
    """Which replica pairs a partition separates (`target` already resolved to an id)."""
    mode = params["mode"]
    if mode in ("isolate-one", "isolate-leader"):
        return {frozenset((target, o)) for o in ids if o != target}
    if mode == "halves":
        return {frozenset((a, b)) for a in params["minority"] for b in params["majority"]}
    if mode == "bridge":
        return {frozenset((a, b)) for a in params["left"] for b in params["right"]}
    raise ValueError(f"unknown partition mode {mode!r}")
