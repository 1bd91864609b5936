"""Sealed frames: tampered, replayed, reordered or injected frames end the session by name; an eavesdropper
on the path of a real session sees no embedding bytes; the loopback and encryption policy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from tpicore.comm.channel import Channel, PeerLost, send_frame
from tpicore.comm.collectives import allreduce, broadcast
from tpicore.comm.endpoint import is_loopback, open_listener
from tpicore.comm.frame import HEADER_NBYTES, MAGIC, TAG_NBYTES, Kind
from tpicore.comm.group import Group
from tpicore.comm.seal import FrameCipher, TamperedFrame, derive_keys
from tpicore.errors import TpiError

SECRET = b"seal-test-secret-0123456789abcdef"


class Tap:
    """Two channels joined through a man in the middle: what rank 1 sends arrives in `wire`, and
    `deliver(data)` hands (possibly altered) bytes on to rank 0."""

    def __init__(self) -> None:
        keys = derive_keys(SECRET, b"j" * 32, b"a" * 32, b"transcript")
        ciphers = FrameCipher.for_joiner(keys, "rank 0"), FrameCipher.for_acceptor(keys, "rank 1")
        for c in ciphers:  # frame 0 of each direction is the handshake's box: data frames count from 1
            c.sealer.advance()
            c.opener.advance()
        a, self._mid_a = socket.socketpair()
        self._mid_b, b = socket.socketpair()
        self.sender = Channel(a, rank=1, peer_rank=0, timeout_s=2.0, cipher=ciphers[0])
        self.receiver = Channel(b, rank=0, peer_rank=1, timeout_s=2.0, cipher=ciphers[1])

    def send(self, arr: np.ndarray) -> bytes:
        """What rank 1 puts on the wire for `arr` (one sealed frame)."""
        self.sender.send_array(Kind.TENSOR, arr)
        n = HEADER_NBYTES + TAG_NBYTES + arr.nbytes + (TAG_NBYTES if arr.nbytes else 0)
        data = bytearray()
        while len(data) < n:
            data += self._mid_a.recv(n - len(data))
        return bytes(data)

    def deliver(self, data: bytes) -> None:
        self._mid_b.sendall(data)

    def close(self) -> None:
        for s in (self._mid_a, self._mid_b):
            s.close()
        self.sender.close(bye=False)
        self.receiver.close(bye=False)


@pytest.fixture
def tap():
    t = Tap()
    yield t
    t.close()


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]


def test_sealed_frames_round_trip_and_hide_everything(tap):
    x = np.arange(64, dtype=np.float32)
    wire = tap.send(x)
    assert MAGIC not in wire and x.tobytes()[:16] not in wire  # header and payload both sealed
    tap.deliver(wire)
    np.testing.assert_array_equal(tap.receiver.recv_array(), x)


@pytest.mark.parametrize("where, part", [(3, "header"), (HEADER_NBYTES + TAG_NBYTES + 5, "payload"),
                                         (HEADER_NBYTES + 2, "header"), (-1, "payload")])
def test_a_flipped_bit_anywhere_ends_the_session_naming_the_peer(tap, where, part):
    wire = tap.send(np.arange(64, dtype=np.float32))
    tap.deliver(_flip(wire, where % len(wire)))
    with pytest.raises(TamperedFrame, match=rf"the {part} of frame 1 from rank 1 failed authentication"):
        tap.receiver.recv_array()


def test_a_replayed_frame_is_refused(tap):
    first = tap.send(np.ones(8, np.float32))
    tap.deliver(first)
    tap.receiver.recv_array()
    tap.deliver(first)  # the same bytes again: sealed for frame 1, expected frame 2
    with pytest.raises(TamperedFrame, match="frame 2 from rank 1 failed authentication .*replayed"):
        tap.receiver.recv_array()


def test_reordered_or_dropped_frames_are_refused(tap):
    first, second = tap.send(np.ones(8, np.float32)), tap.send(np.zeros(8, np.float32))
    assert first != second
    tap.deliver(second)  # the first one dropped (or delayed)
    with pytest.raises(TamperedFrame, match="frame 1 from rank 1"):
        tap.receiver.recv_array()


def test_an_injected_plain_frame_is_refused(tap):
    a, b = socket.socketpair()
    try:
        send_frame(a, Kind.TENSOR, np.ones(8, np.float32), src=1)
        tap.deliver(b.recv(4096))
    finally:
        a.close()
        b.close()
    with pytest.raises(TamperedFrame, match="header of frame 1 from rank 1"):
        tap.receiver.recv_array()


# --- a real group through a recording TCP relay


class Relay:
    """A TCP relay on loopback recording every byte in both directions; can alter or inject bytes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lst.getsockname()[:2]
        self.captured = bytearray()
        self.to_client: list[socket.socket] = []  # the client-side socket of each relayed connection
        self.flip_next_to_client = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:  # the target does not listen yet: the client retries
                client.close()
                continue
            self.to_client.append(client)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                for s in (dst, src):
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            with self.lock:
                if to_client and self.flip_next_to_client:
                    data = _flip(data, len(data) // 2)
                    self.flip_next_to_client = False
                self.captured += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.lst.close()


def group_through_relay(**kw) -> tuple[Group, Group, Relay]:
    """A group of 2 (no mesh): rank 1 reaches rank 0 through a Relay."""
    lst = open_listener()
    relay = Relay(lst.getsockname()[:2])
    out: dict = {}
    t = threading.Thread(target=lambda: out.__setitem__(1, Group.worker(1, relay.addr, world_size=2, timeout_s=5,
                                                                        **kw)), daemon=True)
    t.start()
    master = Group.master(2, listener=lst, timeout_s=5, mesh=False, **kw)
    t.join(10)
    return master, out[1], relay


def _both(master: Group, worker: Group, fn) -> dict:
    out: dict = {}

    def run(g: Group) -> None:
        try:
            out[g.rank] = fn(g)
        except Exception as e:
            out[g.rank] = e

    threads = [threading.Thread(target=run, args=(g,)) for g in (master, worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return out


def test_tampering_on_the_path_ends_the_session_with_a_clear_error():
    master, worker, relay = group_through_relay(secret=SECRET)
    try:
        assert _both(master, worker, lambda g: allreduce(g, np.ones(256, np.float32)).tolist())[1] == [2.0] * 256
        relay.flip_next_to_client = True  # the next bytes rank 0 sends to rank 1 are altered on the way
        out = _both(master, worker, lambda g: [allreduce(g, np.ones(256, np.float32)) for _ in range(2)])
        assert isinstance(out[1], TamperedFrame), out[1]
        assert "from rank 0 failed authentication" in str(out[1])
        assert isinstance(out[0], TpiError) and "rank 0 failed authentication" in str(out[0])  # told by rank 1
        assert "(reported by rank 1)" in str(out[0])
    finally:
        master.close()
        worker.close()
        relay.close()


def test_a_frame_replayed_on_the_path_is_refused():
    master, worker, relay = group_through_relay(secret=SECRET)
    try:
        mark = len(relay.captured)
        _both(master, worker, lambda g: allreduce(g, np.ones(256, np.float32)))
        with relay.lock:
            replay = bytes(relay.captured[mark:])  # both directions of one allreduce, as recorded
        # rank 0's sealed frame to rank 1 is the tail of the recording: send it to rank 1 again
        frame_nbytes = HEADER_NBYTES + TAG_NBYTES + 256 * 4 + TAG_NBYTES
        relay.to_client[0].sendall(replay[-frame_nbytes:])
        out = _both(master, worker, lambda g: allreduce(g, np.ones(256, np.float32)))
        assert isinstance(out[1], TamperedFrame) and "from rank 0" in str(out[1]), out[1]
    finally:
        master.close()
        worker.close()
        relay.close()


def test_the_relay_sees_plain_arrays_only_without_encryption():
    """The eavesdropper's search works: plain frames show the broadcast rows, sealed frames do not."""
    rows = np.random.default_rng(0).standard_normal((5, 48)).astype(np.float32)
    for encrypt, visible in [(False, True), (True, False)]:
        master, worker, relay = group_through_relay(secret=SECRET, encrypt=encrypt)
        try:
            _both(master, worker, lambda g: broadcast(g, rows if g.rank == 0 else None))
            assert all((row.tobytes() in relay.captured) is visible for row in rows), encrypt
        finally:
            master.close()
            worker.close()
            relay.close()


def test_an_eavesdropper_on_a_real_session_sees_no_embedding_bytes(hf_models, tmp_path):
    """`tpi generate --listen` with two `tpi worker`s whose every byte to and from the master passes a
    recording relay: no row of the prompt's embeddings (what the master broadcasts at prefill) appears in
    the capture, not even a 16-byte piece of one; only the handshakes' plain headers carry the magic."""
    model_dir, _ = hf_models("wide")
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "tpicore", "shard", "--model", model_dir, "--devices", "3",
                    "--out", str(shards)], check=True, capture_output=True, timeout=120)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    relay = Relay(("127.0.0.1", port))
    prompt = [101, 17, 42, 99, 77, 130, 64, 12]
    master = subprocess.Popen([sys.executable, "-m", "tpicore", "generate", "--shards", str(shards), "--devices",
                               "3", "--listen", f"127.0.0.1:{port}", "--secret-file", str(secret), "--prompt-ids",
                               ",".join(map(str, prompt)), "--max-new-tokens", "4", "--json", "--timeout-s", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([sys.executable, "-m", "tpicore", "worker", "--rank", str(r), "--master",
                                 f"{relay.addr[0]}:{relay.addr[1]}", "--shards", str(shards), "--secret-file",
                                 str(secret)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for r in (1, 2)]
    try:
        out, err = master.communicate(timeout=120)
        assert master.returncode == 0, err
        for w in workers:
            w.wait(timeout=30)
            assert w.returncode == 0, w.stderr.read()
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
        relay.close()
    captured = bytes(relay.captured)
    embed = load_file(os.path.join(model_dir, "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)
    assert len(captured) > 20 * embed.shape[1] * 4  # the session's traffic went through the relay
    for tok in prompt:
        row = embed[tok].tobytes()  # [D] float32, as broadcast at prefill
        for off in range(0, len(row) - 16, 16):
            assert row[off: off + 16] not in captured, (tok, off)
    assert captured.count(MAGIC) == 2 * 4  # HELLO, CHALLENGE, AUTH, WELCOME per worker; nothing else plain


# --- policy


@pytest.mark.parametrize("host, want", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
                                        ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
                                        ("", False), ("no-such-host.invalid", False)])
def test_is_loopback(host, want):
    assert is_loopback(host) is want


def test_a_name_that_starts_like_loopback_is_judged_by_where_it_resolves(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, 1, 6, "", ("10.99.0.1", 0))])
    assert not is_loopback("127.lan.example")


def test_off_loopback_a_secret_and_encryption_are_required():
    with pytest.raises(TpiError, match="not a loopback address: a shared secret is required"):
        Group.master(2, host="0.0.0.0", timeout_s=0.2)
    with pytest.raises(TpiError, match="not a loopback address: frames must be encrypted"):
        Group.master(2, host="0.0.0.0", secret=SECRET, encrypt=False, timeout_s=0.2)
    with pytest.raises(TpiError, match="192.0.2.1 is not a loopback address: a shared secret is required"):
        Group.worker(1, "192.0.2.1:5000", world_size=2, timeout_s=0.2)


def test_both_ends_must_agree_on_encryption():
    lst = open_listener()
    t = threading.Thread(target=lambda: pytest.raises(TpiError, Group.master, 2, listener=lst, secret=SECRET,
                                                      encrypt=False, timeout_s=3.0), daemon=True)
    t.start()
    with pytest.raises(TpiError, match="encryption mismatch: rank 1 .* wants sealed frames, rank 0 plain ones"):
        Group.worker(1, lst.getsockname()[:2], world_size=2, secret=SECRET, timeout_s=3.0)
    t.join(10)


def test_bye_and_errors_travel_sealed(tap):
    tap.sender.send_error("rank 7 closed the connection", "PeerLost")
    wire = tap._mid_a.recv(4096)
    assert b"rank 7" not in wire
    tap.deliver(wire)
    with pytest.raises(PeerLost, match=r"rank 7 closed the connection \(reported by rank 1\)"):
        tap.receiver.recv_array()
