"""Deferred, coalesced acks (agent/acks.py): pure, so checked exhaustively here."""
from raftmesh.agent.acks import MAX_LISTED, PendingAcks
from raftmesh.proto.routes import ACK


def test_first_apply_starts_the_round_and_later_ones_join_it():
    p = PendingAcks()
    assert not p.due(100.0) and p.take(100.0) is None
    p.add(5, 10.0, delay=1.0)
    p.add(7, 10.4, delay=9.0)  # joins the round: its delay is ignored
    assert not p.due(10.99) and p.due(11.0)
    assert p.take(11.0) == {"version": 7, "applied": [[5, 1.0], [7, 0.6]]}
    assert p.due_at is None and not p.due(1e9) and p.take(12.0) is None


def test_a_burst_is_bounded_to_the_newest_versions():
    p = PendingAcks()
    for v in range(1, MAX_LISTED + 11):
        p.add(v, float(v), delay=0.5)
    body = p.take(1000.0)
    assert body["version"] == MAX_LISTED + 10 and len(body["applied"]) == MAX_LISTED
    assert body["applied"][0][0] == 11


def test_clear_forgets_a_round_of_an_ended_stream():
    p = PendingAcks()
    p.add(3, 1.0, delay=0.5)
    p.clear()
    assert not p.due(5.0) and p.take(5.0) is None


def test_a_waiting_ack_reports_its_versions_as_older():
    from raftmesh.agent.ack_sender import MAX_AGE, aged
    body = {"version": 7, "applied": [[5, 1.0], [7, 0.25]]}
    assert aged(body, 2.0) == {"version": 7, "applied": [[5, 3.0], [7, 2.25]]}
    assert body["applied"][0] == [5, 1.0]  # the queued body is not changed
    assert aged(body, 0.0) is body and aged({"version": 3}, 5.0) == {"version": 3}
    assert aged(body, 1e9)["applied"][0][1] == MAX_AGE


def test_an_ack_lost_in_transit_is_sent_again_with_grown_ages():
    """After a quiet change (a revocation) no later ack may come to cover a lost one."""
    import http.server
    import json
    import threading

    from nacl.signing import SigningKey

    from conftest import wait_until
    from raftmesh.agent import ack_sender

    received, requests = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append(self.path)
            data = self.rfile.read(int(self.headers["Content-Length"]))
            if len(requests) == 1:  # the first one dies in transit: no answer at all
                self.close_connection = True
                return
            received.append(json.loads(data))
            out = json.dumps({"node_id": "n1", "version": 7, "streaming_here": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sender = ack_sender.AckSender(SigningKey.generate())
    try:
        sender.send(f"http://127.0.0.1:{server.server_port}", {"version": 7, "applied": [[7, 0.5]]})
        wait_until(lambda: received, 10, what="the ack sent again")
        assert requests == [ACK, ACK]
        assert received[0]["version"] == 7
        assert received[0]["applied"][0][1] >= 0.5 + ack_sender.RETRY_AFTER  # waited for the retry
    finally:
        sender.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_ack_datagrams_carry_the_body_under_the_stream_key():
    import pytest
    from raftmesh.proto.ack_datagram import (MAX_DATAGRAM, AckDatagramError, decode_ack, decode_confirm,
                                             encode_ack, encode_confirm, tag_matches)
    key = bytes(range(32))
    body = {"version": 7, "applied": [[5, 1.0], [7, 0.25]], "paths": {"direct": 2, "relay": 1}}
    nonce, got, tag, payload = decode_ack(encode_ack(("s1", key), body))
    assert (nonce, got) == ("s1", body) and tag_matches(key, tag, payload)
    assert not tag_matches(bytes(32), tag, payload)
    forged = encode_ack(("s1", key), body).replace(b'"version":7', b'"version":8')
    assert not tag_matches(key, *decode_ack(forged)[2:])
    for bad in (b"RMAK" + b"x" * 30, b"RMAK" + b"t" * 24 + b'{"version": 1}',
                b"RMAK" + b"t" * 24 + b'{"stream": "s", "version": NaN}', b"\x00\x01" + b"x" * 40,
                b"RMAK" + b"t" * 24 + b"[1]", b"RMAK" + b"x" * MAX_DATAGRAM):
        with pytest.raises(AckDatagramError):
            decode_ack(bad)
    with pytest.raises(AckDatagramError):  # never split or truncated: HTTP takes it instead
        encode_ack(("s1", key), {"version": 1, "applied": [[v, 0.123456] for v in range(200)]})
    assert decode_confirm(encode_confirm("s1", 7)) == ("s1", 7)
    assert decode_confirm(b"RMOK[1,2]") is None and decode_confirm(b"RMOK{") is None
    assert decode_confirm(b"xxxx") is None


def test_the_daemon_acks_by_datagram_and_over_http_when_no_confirmation_comes(monkeypatch):
    import socket

    import pytest
    import threading

    from nacl.signing import SigningKey

    from raftmesh.agent import ack_sender
    from raftmesh.proto.ack_datagram import decode_ack, encode_confirm

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    seen = []

    def replica():  # confirms the first datagram, ignores the second
        for confirm in (True, False):
            data, addr = udp.recvfrom(2048)
            nonce, body, _, _ = decode_ack(data)
            seen.append(body["version"])
            if confirm:
                udp.sendto(encode_confirm(nonce, body["version"]), addr)
    thread = threading.Thread(target=replica, daemon=True)
    thread.start()
    sender = ack_sender.AckSender(SigningKey.generate())
    posted = []
    monkeypatch.setattr(ack_sender.ControlClient, "signed_request",
                        lambda self, m, p, body, **kw: posted.append(body))
    try:
        auth, addr = ("s1", bytes(32)), udp.getsockname()
        sender.send("http://127.0.0.1:9", {"version": 3}, auth, addr)
        sender.send("http://127.0.0.1:9", {"version": 4}, auth, addr)
        from conftest import wait_until
        wait_until(lambda: posted, 10, what="the unconfirmed ack over HTTP")
        assert seen == [3, 4] and [b["version"] for b in posted] == [4]
        udp.settimeout(0.5)  # after an unconfirmed datagram, HTTP only for a while: no wait
        sender.send("http://127.0.0.1:9", {"version": 5}, auth, addr)
        wait_until(lambda: len(posted) == 2, 10, what="the next ack straight over HTTP")
        assert [b["version"] for b in posted] == [4, 5]
        with pytest.raises(socket.timeout):
            udp.recvfrom(2048)
    finally:
        sender.close()
        thread.join(5)
        udp.close()
