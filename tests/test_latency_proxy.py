"""The chaos harness's user-space latency proxy (lab/latency_proxy.py), in process."""
import asyncio
import errno

from raftmesh.lab import latency_proxy
from raftmesh.lab.local_cluster import free_ports


def test_a_connection_that_fails_while_set_up_closes_its_upstream(monkeypatch):
    """A peer gone before the proxy tuned its socket (EBADF) once left the proxy's connection
    to the replica open with nobody relaying it (chaos campaign seed 24)."""
    def failing_tune(writer):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(latency_proxy, "_tune", failing_tune)
    listen, target, control = free_ports(3)

    async def scenario():
        upstream_closed = asyncio.Event()

        async def replica(reader, writer):
            await reader.read()  # EOF: the proxy closed its side
            upstream_closed.set()
            writer.close()
        server = await asyncio.start_server(replica, "127.0.0.1", target)
        proxy = asyncio.create_task(latency_proxy.serve(
            [(("127.0.0.1", listen), ("127.0.0.1", target))], ("127.0.0.1", control)))
        try:
            for _ in range(100):  # the proxy's listener comes up
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", listen)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(upstream_closed.wait(), 10)
            writer.close()
        finally:
            proxy.cancel()
            server.close()
    asyncio.run(scenario())
