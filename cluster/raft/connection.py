"""pysyncobj's replica-to-replica connection, reading a message with one system call.

pysyncobj 0.3.17 handles a readable connected socket with getsockopt(SO_ERROR), recv,
getsockopt again and a last recv that fails with EAGAIN: four system calls per message.
Each lets go of the interpreter lock, and on a busy replica the event loop thread is
usually waiting for it, so every release hands the lock over and the Raft thread then
waits to get it back (up to the 5 ms switch interval): these calls cost far more than
their own time. Here a readable connected socket gets recv calls only, stopping at the
first that does not fill the buffer (poll is level-triggered: what arrives later is
reported again); errors and end of stream come from recv itself, as they do on any
connected socket. Everything else (connecting, where SO_ERROR is how a non-blocking
connect reports failure; writes; error events) is pysyncobj's own code.

A quiet link also stays open when it is next used. pysyncobj drops a connection on which
nothing was read for `timeout` seconds, checked when it sends and when something arrives:
right for a peer that stopped answering what it was sent, wrong for a link on which neither
side had anything to say. Two followers exchange nothing until an election, so the first
candidate's vote request was lost with the link, at both ends (the sender's check, then the
receiver's, before reading the request), and the election took a second term: in bench
failover the first leader kill of every run, ~900 ms against ~400 ms for the others, whose
follower pairs had talked less than a second before. Here arriving bytes count as hearing
from the peer, and a send after `timeout` of our own silence starts the wait for an answer
afresh; a peer that reads nothing of what it is kept sent is still cut off after `timeout`.
"""
from __future__ import annotations

import pysyncobj.tcp_connection as pso_tcp
import pysyncobj.tcp_server as pso_tcp_server
import pysyncobj.transport as pso_transport
from pysyncobj.monotonic import monotonic
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE

_Base = pso_tcp.TcpConnection


class OneCallReadConnection(_Base):
    _last_send = float("-inf")  # monotonic time of this connection's last send

    def send(self, message):
        """A send after `timeout` of silence waits for an answer afresh (module doc)."""
        now = monotonic()
        if now - self._last_send > self._TcpConnection__timeout:
            self._TcpConnection__lastReadTime = now
        self._last_send = now
        return _Base.send(self, message)

    # pysyncobj's private members, by their mangled names (its methods call these).
    def _TcpConnection__processConnection(self, descr, event_type):
        connected = self.state == CONNECTION_STATE.CONNECTED
        if event_type != POLL_EVENT_TYPE.READ or descr != self.fileno() or not connected:
            if connected and event_type & POLL_EVENT_TYPE.READ:
                # the peer spoke: not timed out (module doc); pysyncobj checks before reading
                self._TcpConnection__lastReadTime = monotonic()
            return _Base._TcpConnection__processConnection(self, descr, event_type)
        # No timeout check here: bytes arrived, and reading them refreshes lastReadTime.
        self._TcpConnection__tryReadBuffer()
        while self.state != CONNECTION_STATE.DISCONNECTED:
            message = self._TcpConnection__processParseMessage()
            if message is None:
                return
            on_message = self._TcpConnection__onMessageReceived
            if on_message is not None:
                on_message(message)

    def _TcpConnection__tryReadBuffer(self):
        sock, size = self._TcpConnection__socket, self._TcpConnection__recvBufferSize
        while True:
            try:
                incoming = sock.recv(size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.disconnect()
                return
            if not incoming:  # the peer closed the connection
                self.disconnect()
                return
            self._TcpConnection__readBuffer += incoming
            if len(incoming) < size:
                break
        self._TcpConnection__lastReadTime = monotonic()


def install() -> None:
    """Idempotent; process-wide (the names pysyncobj's transport and server build from)."""
    pso_transport.TcpConnection = OneCallReadConnection
    pso_tcp_server.TcpConnection = OneCallReadConnection
