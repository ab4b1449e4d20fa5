"""pysyncobj's message and command encoding after codec.install(): cheaper, and still
readable by a replica without it (rolling upgrades) and from journals written before it."""
import pickle
import zlib

import pysyncobj.pickle as pso_pickle
import pysyncobj.tcp_connection as pso_tcp

from raftmesh.cluster.raft import codec


def test_commands_pickle_with_protocol_5_and_old_entries_still_load():
    codec.install()
    entry = (0, (b'{"op":"user.create"}',))
    data = pso_pickle.dumps(entry)
    assert data[:2] == b"\x80\x05" and pickle.loads(data) == entry
    written_before = pickle.dumps(entry, 2)  # a journal entry of an older replica
    assert pso_pickle.loads(written_before) == entry


def test_messages_are_zlib_streams_any_receiver_decompresses():
    codec.install()
    small, large = b"ae" * 1000, bytes(range(256)) * 1024  # 2 KB; 256 KiB
    sent_small, sent_large = pso_tcp.zlib.compress(small, 3), pso_tcp.zlib.compress(large, 3)
    assert zlib.decompress(sent_small) == small and len(sent_small) > len(small)  # stored
    assert zlib.decompress(sent_large) == large and len(sent_large) < len(large) // 10
    old_sender = zlib.compress(small, 3)  # what a replica without the module sends
    assert pso_tcp.zlib.decompress(old_sender) == small
