"""The frame format, channels and the handshake: round trips, a fuzzed decoder, every refusal the master makes."""

from __future__ import annotations

import socket
import struct
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpicore.comm.channel import (
    NO_LINK_HOOK,
    Channel,
    PeerLost,
    PeerTimeout,
    recv_frame,
    send_frame,
)
from tpicore.comm.endpoint import open_listener
from tpicore.comm.frame import (
    DEFAULT_MAX_NBYTES,
    HEADER,
    HEADER_NBYTES,
    MAGIC,
    PROTOCOL_VERSION,
    STAMPED,
    STAMPS_NBYTES,
    DType,
    Kind,
    ProtocolError,
    Stamps,
    header_for,
    json_payload,
    pack_header,
    pack_stamps,
    parse_json,
    unpack_header,
    unpack_stamps,
    wire_nbytes,
)
from tpicore.comm.group import Group
from tpicore.comm.handshake import Terms, join_peer
from tpicore.comm.seal import FrameCipher, derive_keys
from tpicore.errors import TpiError

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.uint8]
SHAPES = [(), (5,), (2, 3), (2, 1, 4), (3, 2, 1, 2), (0, 3)]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(2.0)
    b.settimeout(2.0)
    yield a, b
    a.close()
    b.close()


def _feed(data: bytes, max_nbytes: int = 1 << 20):
    """Write `data`, close the writer, decode one frame from the other end: (header, array) or the exception."""
    a, b = socket.socketpair()
    try:
        b.settimeout(2.0)  # a hang would show up as PeerTimeout, which the fuzz tests do not accept
        a.sendall(data)
        a.close()
        try:
            return recv_frame(b, max_nbytes=max_nbytes)
        except (ProtocolError, PeerLost) as e:
            assert str(e), "errors must say what went wrong"
            return e
    finally:
        a.close()
        b.close()


def _sample(dtype, shape) -> np.ndarray:
    return (np.arange(int(np.prod(shape)), dtype=np.float64) * 1.5 - 3).astype(dtype).reshape(shape)


def test_header_layout_is_fixed():
    assert HEADER_NBYTES == HEADER.size == 40 and STAMPS_NBYTES == 16
    h = pack_header(Kind.TENSOR, DType.F16, (7, 9), src=3, tag=0xABCDEF01, nbytes=7 * 9 * 2, flags=STAMPED)
    assert h[:4] == MAGIC
    assert struct.unpack_from("<HBBBB", h, 4) == (PROTOCOL_VERSION, Kind.TENSOR, DType.F16, 2, STAMPED)
    assert struct.unpack_from("<HI", h, 10) == (3, 0xABCDEF01)
    assert struct.unpack_from("<4I", h, 16) == (7, 9, 0, 0)
    assert struct.unpack_from("<Q", h, 32) == (126,)
    assert pack_stamps(Stamps(1.25, 2.5)) == struct.pack("<dd", 1.25, 2.5)
    assert unpack_stamps(pack_stamps(Stamps(1.25, 2.5))) == (1.25, 2.5)


class StampingHook:
    """Stamps every frame (now 1.0, delivery 3.0) and records what the receiving side sees."""

    def __init__(self):
        self.seen = []

    def now(self) -> float:
        return 1.0

    def on_send(self, src, dst, nbytes) -> float:
        return 3.0

    def on_wait(self, src, dst) -> None:
        pass

    def on_recv(self, src, dst, nbytes, t_send, t_deliver) -> None:
        self.seen.append((src, dst, nbytes, t_send, t_deliver))


def channel_pair(sealed: bool, rank_a: int = 2, rank_b: int = 0) -> tuple[Channel, Channel]:
    """Two connected channels (a = rank_a, b = rank_b), sealed with fresh keys when asked."""
    a, b = socket.socketpair()
    ca = cb = None
    if sealed:
        keys = derive_keys(b"k" * 32, b"j" * 32, b"a" * 32, b"transcript")
        ca, cb = FrameCipher.for_joiner(keys, "rank b"), FrameCipher.for_acceptor(keys, "rank a")
    return (Channel(a, rank=rank_a, peer_rank=rank_b, timeout_s=2.0, cipher=ca),
            Channel(b, rank=rank_b, peer_rank=rank_a, timeout_s=2.0, cipher=cb))


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_ndim(dtype, shape, sealed):
    a, b = channel_pair(sealed)
    x = _sample(dtype, shape)
    a.link_hook = StampingHook()
    b.link_hook = hook = StampingHook()
    a.send_array(Kind.TENSOR, x, tag=7)
    y = b.recv_array(Kind.TENSOR, tag=7)
    assert hook.seen == [(2, 0, wire_nbytes(x.nbytes, sealed), 1.0, 3.0)]
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    assert y.tobytes() == x.tobytes()
    # into a preallocated buffer, unstamped (no hook): same bytes, and the buffer itself is filled
    out = np.empty(shape, dtype)
    a.link_hook = NO_LINK_HOOK
    a.send_array(Kind.BCAST, x)
    assert b.recv_into(out, Kind.BCAST) is out
    assert out.tobytes() == x.tobytes()
    assert hook.seen[1][3:] == (0.0, 0.0)
    a.close()
    b.close()


def test_plain_frames_carry_no_extension_unless_stamped(pair):
    a, b = pair
    ch = Channel(a, rank=1, peer_rank=0, timeout_s=2.0)
    ch.send_array(Kind.TENSOR, np.zeros(3, np.float32))
    assert len(b.recv(4096)) == HEADER_NBYTES + 12  # a real run pays for no timestamps
    ch.link_hook = StampingHook()
    ch.send_array(Kind.TENSOR, np.zeros(3, np.float32))
    assert len(b.recv(4096)) == HEADER_NBYTES + STAMPS_NBYTES + 12


def test_non_contiguous_arrays_are_sent_as_their_values(pair):
    a, b = pair
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    send_frame(a, Kind.TENSOR, x)
    np.testing.assert_array_equal(recv_frame(b)[1], x)


def test_recv_into_rejects_a_frame_of_another_shape(pair):
    a, b = pair
    send_frame(a, Kind.TENSOR, np.zeros(4, np.float32), src=1)
    with pytest.raises(ProtocolError, match=r"sent shape \(4,\) float32, expected \(5,\) float32"):
        Channel(b, rank=0, peer_rank=1, timeout_s=2.0).recv_into(np.empty(5, np.float32))


def test_unsendable_arrays_are_refused():
    with pytest.raises(TpiError, match="float64 cannot be sent"):
        header_for(Kind.TENSOR, np.zeros(2), src=0, tag=0)
    with pytest.raises(TpiError, match="at most 4 dimensions"):
        header_for(Kind.TENSOR, np.zeros((1,) * 5, np.float32), src=0, tag=0)


def _good(**over) -> dict:
    fields = dict(kind=Kind.TENSOR, dtype=DType.F32, shape=(2, 3), src=1, tag=0, nbytes=24)
    fields.update(over)
    return fields


@pytest.mark.parametrize("raw, match", [
    (b"XXXX" + pack_header(**_good())[4:], "bad magic"),
    (pack_header(**_good(), version=PROTOCOL_VERSION + 1), "protocol version"),
    (pack_header(**_good(kind=99)), "unknown message kind 99"),
    (pack_header(**_good(dtype=42)), "unknown dtype code 42"),
    (pack_header(**_good(shape=(1, 1, 1, 1), nbytes=4))[:8] + b"\x05" + pack_header(**_good())[9:], "ndim 5"),
    (pack_header(**_good(nbytes=25)), "does not match shape"),
    (pack_header(**_good(shape=(1 << 20, 1 << 12), nbytes=1 << 34)), "exceeds the limit"),
    (pack_header(**_good(flags=0x80)), "unknown flag bits 0x80"),
    (pack_header(**_good(shape=(2, 3), nbytes=24))[:8] + b"\x01" + pack_header(**_good())[9:], "past ndim"),
])
def test_decoder_names_the_bad_field(raw, match):
    with pytest.raises(ProtocolError, match=match):
        unpack_header(raw, DEFAULT_MAX_NBYTES)


@pytest.mark.parametrize("t_send, t_deliver", [(float("nan"), 0.0), (0.0, float("inf")), (-1.0, 0.0)])
def test_bad_timestamps_are_refused(t_send, t_deliver):
    with pytest.raises(ProtocolError, match="bad timestamps"):
        unpack_stamps(struct.pack("<dd", t_send, t_deliver))


def test_json_payloads(pair):
    assert parse_json(json_payload({"a": [1, "x"]})) == {"a": [1, "x"]}
    for bad in (b"\xff\xfe", b"{not json", b"[1, 2]"):
        with pytest.raises(ProtocolError, match="JSON"):
            parse_json(np.frombuffer(bad, np.uint8))


# --- fuzzing: whatever arrives, the decoder raises ProtocolError or PeerLost (never hangs, never crashes)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    got = _feed(data)
    if not isinstance(got, Exception):
        assert data[:4] == MAGIC  # only a well-formed frame may decode


@st.composite
def frames(draw):
    code = draw(st.sampled_from(list(DType)))
    itemsize = {DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.I32: 4, DType.I64: 8, DType.U8: 1}[code]
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    header = pack_header(draw(st.sampled_from(list(Kind))), code, shape, src=draw(st.integers(0, 65535)),
                         tag=draw(st.integers(0, 2**32 - 1)), nbytes=nbytes)
    return header + draw(st.binary(min_size=nbytes, max_size=nbytes))


@FUZZ
@given(frames())
def test_fuzz_valid_frames_decode(frame):
    got = _feed(frame)
    assert not isinstance(got, Exception), got
    assert got[1].nbytes == len(frame) - HEADER_NBYTES


@FUZZ
@given(frames(), st.data())
def test_fuzz_truncated_frames(frame, data):
    cut = data.draw(st.integers(0, len(frame) - 1))
    got = _feed(frame[:cut])
    assert isinstance(got, PeerLost) and "closed the connection" in str(got)


@FUZZ
@given(frames(), st.data())
def test_fuzz_corrupted_header(frame, data):
    pos = data.draw(st.integers(0, HEADER_NBYTES - 1))
    val = data.draw(st.integers(0, 255))
    got = _feed(frame[:pos] + bytes([val]) + frame[pos + 1:])
    # a changed tag/src/flag can still be a valid frame; everything else must be refused cleanly
    assert not isinstance(got, Exception) or isinstance(got, (ProtocolError, PeerLost))


@FUZZ
@given(st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1), st.sampled_from([DType.U8, DType.F32]))
def test_fuzz_oversized_payloads_are_refused_before_allocating(d0, d1, code):
    nbytes = d0 * d1 * (1 if code == DType.U8 else 4)
    got = _feed(pack_header(Kind.TENSOR, code, (d0, d1), src=0, tag=0, nbytes=nbytes % 2**64), max_nbytes=1 << 20)
    if nbytes >= 2**64:  # the u64 field wrapped: no longer matches the shape
        assert isinstance(got, ProtocolError) and "does not match shape" in str(got)
    elif nbytes > 1 << 20:
        assert isinstance(got, ProtocolError) and "exceeds the limit" in str(got)
    else:  # small enough to be legal: then the missing payload is the problem
        assert isinstance(got, PeerLost)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_channel_with_kernel_timeouts(data):
    a, b = socket.socketpair()
    ch = Channel(b, rank=0, peer_rank=1, timeout_s=2.0, max_nbytes=1 << 16)
    try:
        a.sendall(data)
        a.close()
        with pytest.raises((ProtocolError, PeerLost)):
            ch.recv_array()
    finally:
        a.close()
        ch.close(bye=False)


def test_silent_peer_times_out_naming_it(pair):
    a, b = pair
    ch = Channel(b, rank=0, peer_rank=3, timeout_s=0.2)
    with pytest.raises(PeerTimeout, match=r"rank 3 sent nothing for 0\.2 s"):
        ch.recv_array()
    a.sendall(pack_header(**_good(src=3))[:20])  # stalls mid-header
    with pytest.raises(PeerTimeout, match=rf"rank 3 sent nothing for 0\.2 s mid-frame \(20 of {HEADER_NBYTES} bytes\)"):
        ch.recv_array()


@pytest.mark.parametrize("kind, src, obj, exc, match", [
    (Kind.TENSOR, 2, None, ProtocolError, "rank 1 sent a frame claiming to be from rank 2"),
    (Kind.CONTROL, 1, {}, ProtocolError, "expected TENSOR from rank 1, got CONTROL"),
    (Kind.BYE, 1, None, PeerLost, "rank 1 left the group"),
    (Kind.ERROR, 1, {"reason": "rank 5 closed the connection", "error": "PeerLost"}, PeerLost,
     r"rank 5 closed the connection \(reported by rank 1\)"),
    (Kind.ERROR, 1, {"reason": "rank 5 sent nothing", "error": "PeerTimeout"}, PeerTimeout, "rank 5 sent nothing"),
])
def test_channel_checks_sender_and_kind_and_raises_remote_errors(pair, kind, src, obj, exc, match):
    a, b = pair
    ch = Channel(b, rank=0, peer_rank=1, timeout_s=2.0)
    payload = json_payload(obj) if obj is not None else np.zeros(2 if kind == Kind.TENSOR else 0, np.float32)
    send_frame(a, kind, payload, src=src)
    with pytest.raises(exc, match=match):
        ch.recv_array(Kind.TENSOR)


def test_channel_recv_any(pair):
    a, b = pair
    ch = Channel(b, rank=0, peer_rank=1, timeout_s=2.0)
    send_frame(a, Kind.CONTROL, json_payload({"op": "stop"}), src=1)
    send_frame(a, Kind.TENSOR, np.arange(3, dtype=np.int64), src=1)
    send_frame(a, Kind.BCAST, np.zeros(1, np.float32), src=1)
    hdr, payload = ch.recv_any()
    assert hdr.kind == Kind.CONTROL and parse_json(payload) == {"op": "stop"}
    hdr, payload = ch.recv_any()
    assert hdr.kind == Kind.TENSOR and payload.tolist() == [0, 1, 2]
    with pytest.raises(ProtocolError, match="expected CONTROL from rank 1, got BCAST"):
        ch.recv_any()


# --- handshake: the master refuses bad peers with a reason, and keeps waiting for good ones


class MasterThread:
    def __init__(self, world_size: int, **kw):
        self.lst = open_listener()
        self.addr = self.lst.getsockname()[:2]
        self.group = self.error = None
        kw.setdefault("timeout_s", 5.0)
        self.t = threading.Thread(target=self._run, args=(world_size, kw), daemon=True)
        self.t.start()

    def _run(self, world_size, kw):
        try:
            self.group = Group.master(world_size, listener=self.lst, **kw)
        except Exception as e:
            self.error = e

    def join(self):
        self.t.join(10)
        assert not self.t.is_alive()
        return self.group


def _worker_thread(rank, addr, out, **kw) -> threading.Thread:
    def run():
        try:
            out[rank] = Group.worker(rank, addr, **kw)
        except Exception as e:
            out[rank] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_wrong_secret_is_refused_and_master_keeps_waiting():
    m = MasterThread(2, secret=b"s3cret", fingerprint="fp")
    with pytest.raises(TpiError, match="refused rank 1: authentication failed.*wrong shared secret"):
        Group.worker(1, m.addr, world_size=2, secret=b"guess", fingerprint="fp", timeout_s=5)
    with pytest.raises(TpiError, match="requires a shared secret and rank 1 has none"):
        Group.worker(1, m.addr, world_size=2, fingerprint="fp", timeout_s=5)
    w = Group.worker(1, m.addr, world_size=2, secret=b"s3cret", fingerprint="fp", timeout_s=5)
    g = m.join()
    assert g is not None and m.error is None and sorted(g.channels) == [1]
    w.close()
    g.close()


def test_worker_refuses_a_master_that_cannot_prove_the_secret():
    m = MasterThread(2, fingerprint="fp", timeout_s=3.0)
    with pytest.raises(TpiError, match="did not prove the shared secret"):
        Group.worker(1, m.addr, world_size=2, secret=b"s3cret", fingerprint="fp", timeout_s=3)
    m.join()
    assert isinstance(m.error, TpiError) and "rank 0 did not prove the shared secret to rank 1" in str(m.error)


def test_master_times_out_naming_missing_ranks_and_last_refusal():
    m = MasterThread(2, secret=b"a", timeout_s=1.0)
    with pytest.raises(TpiError, match="wrong shared secret"):
        Group.worker(1, m.addr, world_size=2, secret=b"b", timeout_s=1)
    m.join()
    assert isinstance(m.error, TpiError)
    assert "missing rank(s) 1" in str(m.error) and "wrong shared secret" in str(m.error)


@pytest.mark.parametrize("kw, match", [
    (dict(world_size=3), r"world size mismatch: rank 1 .* has world_size 3, rank 0 has 2"),
    (dict(fingerprint="other"), r"model fingerprint mismatch: rank 1 .* has 'other', rank 0 has 'fp'"),
])
def test_mismatched_fields_are_refused_by_name(kw, match):
    """An authenticated peer (it proved the secret) is told both sides' values."""
    m = MasterThread(2, fingerprint="fp", secret=b"k" * 16)
    args = dict(world_size=2, fingerprint="fp", timeout_s=5, secret=b"k" * 16)
    args.update(kw)
    with pytest.raises(TpiError, match=match):
        Group.worker(1, m.addr, **args)
    w = Group.worker(1, m.addr, world_size=2, fingerprint="fp", timeout_s=5, secret=b"k" * 16)
    m.join().close()
    w.close()


def test_mismatched_protocol_version_is_refused_by_name():
    m = MasterThread(2)
    with socket.create_connection(m.addr, timeout=5) as s:
        payload = json_payload({"version": PROTOCOL_VERSION + 1, "world_size": 2, "rank": 1, "fingerprint": "",
                                "nonce": "00" * 32, "listen": None}).tobytes()
        s.sendall(pack_header(Kind.HELLO, DType.U8, (len(payload),), src=1, tag=0, nbytes=len(payload),
                              version=PROTOCOL_VERSION + 1) + payload)
        hdr, reply = recv_frame(s, any_version=True)
        assert hdr.kind == Kind.ERROR
        assert f"protocol version mismatch: rank 1 (peer 127.0.0.1:{s.getsockname()[1]}) speaks version " \
               f"{PROTOCOL_VERSION + 1}, rank 0 speaks {PROTOCOL_VERSION}" == parse_json(reply)["reason"]
    w = Group.worker(1, m.addr, world_size=2, timeout_s=5)
    m.join().close()
    w.close()


def test_duplicate_rank_is_refused():
    m = MasterThread(3, mesh=False)
    first = socket.create_connection(m.addr, timeout=5)  # rank 1, by hand, so it is surely in first
    join_peer(first, rank=1, terms=Terms(3, "", sealed=False), secret=None, expect_rank=0, listen=None)
    with pytest.raises(TpiError, match="rank 1 already joined"):
        Group.worker(1, m.addr, world_size=3, timeout_s=5)
    out: dict = {}
    t2 = _worker_thread(2, m.addr, out, world_size=3, timeout_s=5)
    hdr, peers = recv_frame(first)
    assert hdr.kind == Kind.CONTROL and parse_json(peers) == {"mesh": False, "peers": {}}
    send_frame(first, Kind.CONTROL, json_payload({"ready": True}), src=1)
    g = m.join()
    t2.join(5)
    assert m.error is None and sorted(g.channels) == [1, 2]
    g.close()
    out[2].close()
    first.close()
