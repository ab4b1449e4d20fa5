"""One timer for all of a loop's write timeouts (api/write_deadlines.py)."""
import asyncio

import pytest

from raftmesh.api.write_deadlines import WriteDeadlines


def test_writes_time_out_in_order_and_answered_ones_are_let_go():
    async def scenario():
        loop = asyncio.get_running_loop()
        deadlines = WriteDeadlines(0.2)
        slow = deadlines.watch(loop.create_future())
        answered = [deadlines.watch(loop.create_future()) for _ in range(3)]
        for fut in answered:
            fut.set_result("applied")
        later = deadlines.watch(loop.create_future())
        assert len(deadlines) == 5, "the unanswered head keeps the answered ones behind it"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow, 5)
        assert [f.result() for f in answered] == ["applied"] * 3, "answers are kept"
        assert isinstance(later.exception(), TimeoutError), "same deadline, same sweep"
        assert len(deadlines) == 0
        first = deadlines.watch(loop.create_future())
        first.set_result("applied")
        fresh = deadlines.watch(loop.create_future())
        assert len(deadlines) == 1, "answered writes at the head are dropped"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fresh, 5)  # the timer was re-armed for it
        assert len(deadlines) == 0

    asyncio.run(scenario())
