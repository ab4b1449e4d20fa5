"""The one way tests wait: poll a condition until a deadline (never sleep to synchronise)."""
from raftmesh.lab import processes


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """lab's poller, with a missed deadline reported as a test failure rather than an error."""
    try:
        return processes.wait_until(predicate, timeout, what, interval=interval)
    except TimeoutError as missed:
        raise AssertionError(str(missed)) from None
