"""A frame for a parked stream is written from the fan-out's own turn of the loop, with no
wake-up of the stream's writer, and only when that keeps the stream's frames in order and
its connection uncongested (StreamHub.write_now)."""
import asyncio

from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from raftmesh.api.map_stream import EMPTY_BODY, Stream, StreamHub
from raftmesh.proto.frames import ClusterKey, FrameReader, FrameSigner, encode_body
from raftmesh.proto.machine_auth import b64


class FakeTransport:
    def __init__(self):
        self.unsent, self.closing = 0, False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing


class FakeResponse:
    """Writes as aiohttp's response does: the bytes go out first, then, on a congested
    connection, the coroutine waits for the drain (`drain`); `error` fails the write."""

    def __init__(self):
        self.data, self.drain, self.error = bytearray(), None, None

    async def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.data += data
        if self.drain is not None:
            await self.drain


def hub_and_stream() -> tuple[StreamHub, Stream, FakeResponse, FakeTransport]:
    key = SigningKey.generate()
    hub = StreamHub(None, CollectorRegistry())
    hub.signer = FrameSigner(ClusterKey("k1", b64(bytes(key.verify_key)), b64(bytes(key))))
    stream = hub.subscribe("n1", "127.0.0.1", "nonce-1")
    stream.resp, stream.transport = FakeResponse(), FakeTransport()
    return hub, stream, stream.resp, stream.transport


async def parked(stream: Stream) -> asyncio.Task:
    """The stream's writer, waiting for a wake-up (as serve() does between frames)."""
    task = asyncio.get_running_loop().create_task(stream.wait())
    for _ in range(100):  # a few loop turns: the task runs up to its wait
        if stream.parked():
            return task
        await asyncio.sleep(0)
    raise AssertionError("the writer never parked")


def frames(resp: FakeResponse) -> list[dict]:
    return FrameReader().feed(bytes(resp.data))


def test_a_parked_stream_gets_its_frames_written_at_once_in_order():
    async def scenario():
        hub, stream, resp, _ = hub_and_stream()
        writer = await parked(stream)
        assert hub.write_now(stream, "delta", 5, encode_body({"version": 5}), 1.0)
        assert hub.write_now(stream, "keepalive", 5, EMPTY_BODY, 2.0)
        assert [(f["kind"], f["version"], f["seq"]) for f in frames(resp)] == \
            [("delta", 5, 0), ("keepalive", 5, 1)]
        assert (stream.sent_version, stream.last_sent) == (5, 2.0)
        assert not writer.done(), "the writer was not woken"
        assert hub.write_now(stream, "delta", 4, encode_body({"version": 4}), 3.0)
        assert len(frames(resp)) == 2, "a delta the stream already has is not sent again"
        writer.cancel()
    asyncio.run(scenario())


def test_the_writer_sends_when_it_is_busy_has_frames_queued_or_its_connection_is_congested():
    async def scenario():
        hub, stream, resp, transport = hub_and_stream()
        body = encode_body({"version": 5})
        assert not hub.write_now(stream, "delta", 5, body, 1.0), "writer not parked"
        writer = await parked(stream)
        transport.unsent = 10
        assert not hub.write_now(stream, "delta", 5, body, 1.0), "bytes still unsent"
        transport.unsent = 0
        stream.push("delta", 5, body)  # wakes the writer: it sends this one first
        assert not hub.write_now(stream, "delta", 6, body, 1.0)
        await writer
        assert [v for _, v, _ in stream.take_frames()] == [5]  # as the writer does
        hub.signer = None
        await parked(stream)
        assert not hub.write_now(stream, "delta", 6, body, 1.0), "no signing key"
        assert resp.data == b"" and stream.seq == 0
    asyncio.run(scenario())


def test_a_frame_that_fills_the_connection_is_out_and_a_failed_write_ends_the_stream():
    async def scenario():
        hub, stream, resp, _ = hub_and_stream()
        writer = await parked(stream)
        resp.drain = asyncio.get_running_loop().create_future()  # never drains
        assert hub.write_now(stream, "delta", 5, encode_body({"version": 5}), 1.0)
        assert [f["version"] for f in frames(resp)] == [5] and stream.sent_version == 5
        resp.error = ConnectionResetError("peer went away")
        assert hub.write_now(stream, "delta", 6, encode_body({"version": 6}), 2.0)
        assert stream.keepalive_due and stream.sent_version == 5
        await writer  # woken: its keepalive write fails and ends the stream
    asyncio.run(scenario())
