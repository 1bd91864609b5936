"""Connections between ranks: rendezvous, handshake, authentication, framed send/recv, the link hook.

Owns sockets and their lifetime: `Channel` (one TCP connection to one peer), `Group` (this rank's
channels), the master/worker rendezvous, and helpers that start a whole group on localhost (threads or
forked processes) for tests and benchmarks. Does not sum anything (collectives.py) and does not shape
traffic (the emulator plugs a `LinkHook` in here).

Rendezvous (rank 0 = master; every arrow is one frame, JSON payload unless noted):

    worker r                                   master
      | connect (retry until deadline)  ------>  | accept (keeps waiting past bad peers until deadline)
      | HELLO {version, world_size, rank,        |
      |        fingerprint, nonce_w, listen}  -> | check version
      |                                  <------ | CHALLENGE {nonce_m}                  (secret only)
      | AUTH {HMAC(secret, join|nonce_m|hello)}->| verify                               (secret only)
      |                                          | check world size, rank free, fingerprint; else ERROR
      |                                  <------ | WELCOME {rank, HMAC(secret, accept|nonce_w|...)}
      |   ... master waits until ranks 1..N-1 have joined ...
      |                                  <------ | CONTROL {mesh, peers: {rank: [host, port]}}
      | mesh: connect to every higher rank,      |
      |   accept every lower one (same HELLO..WELCOME exchange, acceptor plays master)
      | CONTROL {ready}                    -----> | all ready -> Group.master returns

Link hook: `Group.link_hook` (None by default) sees every data frame. On send the transport calls
`t_deliver = hook.on_send(src, dst, nbytes)` and stamps `t_send = hook.now()` and `t_deliver` into the
header; after a frame is fully received it calls `hook.on_recv(src, dst, nbytes, t_send, t_deliver)`,
which may block until the delivery deadline or advance a virtual clock. `nbytes` counts the whole frame
(56-byte header + payload). ERROR and BYE frames bypass the hook: failure reports must not queue behind
emulated links. Without a hook the cost is one `is None` check per frame.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np

from tpicore.comm.wire import (
    DEFAULT_MAX_NBYTES,
    HEADER_NBYTES,
    PROTOCOL_VERSION,
    Header,
    Kind,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    check_fits,
    contiguous,
    header_for,
    json_payload,
    parse_json,
    payload_view,
    recv_frame,
    recv_into,
    recv_payload,
    send_buffers,
    set_kernel_timeouts,
    unpack_header,
)
from tpicore.errors import TpiError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
HANDSHAKE_MAX_NBYTES = 64 << 10  # frames from not-yet-authenticated peers stay small
_ABORT_SEND_TIMEOUT_S = 0.5
_ERROR_CLASSES: dict[str, type[TpiError]] = {
    "PeerLost": PeerLost, "PeerTimeout": PeerTimeout, "ProtocolError": ProtocolError}


class LinkHook(Protocol):
    """What the emulator implements to shape traffic (see the module docstring)."""

    def now(self) -> float: ...

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float: ...

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None: ...


def _remote_error(payload: np.ndarray, peer: str) -> TpiError:
    """The exception an ERROR frame stands for, keeping the original reason for forwarding."""
    msg = parse_json(payload, peer)
    reason = str(msg.get("reason", "no reason given"))
    exc = _ERROR_CLASSES.get(str(msg.get("error")), TpiError)(f"{reason} (reported by {peer})")
    exc.reason = reason  # type: ignore[attr-defined]  # abort() forwards the root cause, not a chain
    return exc


class Channel:
    """One TCP connection to one peer: framed arrays and JSON, every wait bounded by `timeout_s`."""

    def __init__(self, sock: socket.socket, *, rank: int, peer_rank: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_nbytes: int = DEFAULT_MAX_NBYTES) -> None:
        self.sock = sock
        self.rank = rank
        self.peer_rank = peer_rank
        self.peer = f"rank {peer_rank}"
        self.timeout_s = timeout_s
        self.max_nbytes = max_nbytes
        self.link_hook: LinkHook | None = None
        self.tx_broken = False  # a send stopped mid-frame: nothing more may go out on this stream
        self._hdr = bytearray(HEADER_NBYTES)  # reused for every received header
        set_kernel_timeouts(sock, timeout_s)

    def __repr__(self) -> str:
        return f"Channel(rank {self.rank} <-> {self.peer})"

    # -- sending ---------------------------------------------------------------------------------------
    def header(self, kind: int, arr: np.ndarray, tag: int) -> bytes:
        """The header for `arr`, stamped by the link hook when there is one."""
        hook = self.link_hook
        if hook is None:
            return header_for(kind, arr, src=self.rank, tag=tag)
        t_send = hook.now()
        t_deliver = hook.on_send(self.rank, self.peer_rank, HEADER_NBYTES + arr.nbytes)
        return header_for(kind, arr, src=self.rank, tag=tag, t_send=t_send, t_deliver=t_deliver)

    def send_array(self, kind: int, arr: np.ndarray, tag: int = 0) -> None:
        """Send one array (copied only if not C-contiguous)."""
        arr = contiguous(arr)
        self.send_raw(self.header(kind, arr, tag), payload_view(arr))

    def send_raw(self, header: bytes, payload: memoryview) -> None:
        try:
            send_buffers(self.sock, header, payload, self.peer)
        except PeerLost as e:
            self.tx_broken = True
            raise self._pending_error() or e from None
        except TpiError:
            self.tx_broken = True
            raise

    def send_json(self, kind: int, obj: object, tag: int = 0) -> None:
        self.send_array(kind, json_payload(obj), tag)

    def send_error(self, reason: str, error: str = "TpiError", timeout_s: float = _ABORT_SEND_TIMEOUT_S) -> None:
        """Best-effort ERROR frame (bypasses the hook); never raises."""
        if self.tx_broken:
            return
        try:
            self.sock.settimeout(timeout_s)
            payload = json_payload({"reason": reason, "error": error})
            send_buffers(self.sock, header_for(Kind.ERROR, payload, src=self.rank, tag=0),
                         payload_view(payload), self.peer)
        except (TpiError, OSError):
            self.tx_broken = True

    # -- receiving -------------------------------------------------------------------------------------
    def recv_header(self) -> Header:
        recv_into(self.sock, memoryview(self._hdr), self.peer)
        return self.header_from_buffer()

    def header_from_buffer(self) -> Header:
        """Validate a header already sitting in the reused header buffer (filled by `exchange`)."""
        try:
            hdr = unpack_header(self._hdr, self.max_nbytes)
        except ProtocolError as e:
            raise ProtocolError(f"from {self.peer}: {e}") from None
        if hdr.src != self.peer_rank:
            raise ProtocolError(f"{self.peer} sent a frame claiming to be from rank {hdr.src}")
        return hdr

    def check(self, hdr: Header, kind: int, tag: int | None) -> None:
        """Raise what an ERROR/BYE frame stands for, or ProtocolError for the wrong kind or tag."""
        if hdr.kind == Kind.ERROR:
            if hdr.nbytes > HANDSHAKE_MAX_NBYTES:
                raise ProtocolError(f"{self.peer} sent an ERROR frame of {hdr.nbytes} bytes")
            raise _remote_error(recv_payload(self.sock, hdr, self.peer), self.peer)
        if hdr.kind == Kind.BYE:
            raise PeerLost(f"{self.peer} left the group")
        if hdr.kind != kind:
            raise ProtocolError(f"expected {Kind(kind).name} from {self.peer}, got {Kind(hdr.kind).name}")
        if tag is not None and hdr.tag != tag:
            raise ProtocolError(f"expected tag {tag} from {self.peer}, got {hdr.tag} (ranks out of step)")

    def received(self, hdr: Header) -> None:
        """Call once a data frame is fully in: lets the link hook hold it until its delivery time."""
        hook = self.link_hook
        if hook is not None:
            hook.on_recv(hdr.src, self.rank, HEADER_NBYTES + hdr.nbytes, hdr.t_send, hdr.t_deliver)

    def recv_array(self, kind: int = Kind.TENSOR, tag: int | None = None) -> np.ndarray:
        """Receive one array into new memory; its shape and dtype come from the header."""
        hdr = self.recv_header()
        self.check(hdr, kind, tag)
        arr = recv_payload(self.sock, hdr, self.peer)
        self.received(hdr)
        return arr

    def recv_any(self, kinds: tuple[int, ...] = (Kind.CONTROL, Kind.TENSOR)) -> tuple[Header, np.ndarray]:
        """Next frame of any of `kinds` into new memory: (header, payload). ERROR/BYE/other kinds raise."""
        hdr = self.recv_header()
        if hdr.kind not in kinds:
            self.check(hdr, kinds[0], None)
        arr = recv_payload(self.sock, hdr, self.peer)
        self.received(hdr)
        return hdr, arr

    def recv_into(self, out: np.ndarray, kind: int = Kind.TENSOR, tag: int | None = None) -> np.ndarray:
        """Receive one array into the preallocated C-contiguous `out` (same shape and dtype); returns `out`."""
        hdr = self.recv_header()
        self.check(hdr, kind, tag)
        check_fits(hdr, out, self.peer)
        if hdr.nbytes:
            recv_into(self.sock, payload_view(out), self.peer)
        self.received(hdr)
        return out

    def recv_json(self, kind: int = Kind.CONTROL, tag: int | None = None) -> dict:
        return parse_json(self.recv_array(kind, tag), self.peer)

    def _pending_error(self) -> TpiError | None:
        """After a failed send: an ERROR frame the peer sent before leaving explains why (None if absent)."""
        try:
            self.sock.settimeout(0.2)
            for _ in range(8):
                hdr, payload = recv_frame(self.sock, max_nbytes=self.max_nbytes, peer=self.peer)
                if hdr.kind == Kind.ERROR:
                    return _remote_error(payload, self.peer)
        except (TpiError, OSError):
            pass
        return None

    def close(self, bye: bool = True) -> None:
        """Close the socket (a best-effort BYE first, without waiting)."""
        if self.sock.fileno() < 0:
            return
        if bye and not self.tx_broken:
            try:
                self.sock.setblocking(False)
                empty = np.empty(0, np.uint8)
                self.sock.send(header_for(Kind.BYE, empty, src=self.rank, tag=0))
            except OSError:
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # EOF now, even if a forked child still holds the fd
        except OSError:
            pass
        self.sock.close()


def exchange(send_ch: Channel | None, kind: int, arr: np.ndarray | None, tag: int,
             recv_ch: Channel | None, out: np.ndarray | None) -> None:
    """Send `arr` on `send_ch` while receiving one frame into `out` from `recv_ch`, concurrently.

    Ring steps have every rank send and receive at once; with blocking sends a payload bigger than the
    socket buffers would deadlock the ring. The send is tried without blocking; if the kernel takes it
    whole (the usual case for activations) this is a plain receive, otherwise both directions are pumped
    with poll() (no threads, no spinning). Either side may be None (nothing to send / to receive).
    """
    if send_ch is None or arr is None:
        if recv_ch is not None and out is not None:
            recv_ch.recv_into(out, kind, tag)
        return
    if recv_ch is None or out is None:
        send_ch.send_array(kind, arr, tag)
        return
    arr = contiguous(arr)
    tx: list[memoryview] = [memoryview(send_ch.header(kind, arr, tag)), payload_view(arr)]
    tx_left = HEADER_NBYTES + arr.nbytes
    n = _send_some(send_ch, tx)
    tx_left -= n
    if not tx_left:
        recv_ch.recv_into(out, kind, tag)
        return
    _advance(tx, n)
    rx_view = memoryview(recv_ch._hdr)
    rx_left = HEADER_NBYTES
    rx_hdr: Header | None = None
    sfd, rfd = send_ch.sock.fileno(), recv_ch.sock.fileno()
    poller = select.poll()
    if sfd == rfd:
        poller.register(sfd, select.POLLIN | select.POLLOUT)
    else:
        poller.register(sfd, select.POLLOUT)
        poller.register(rfd, select.POLLIN)
    timeout_ms = int(recv_ch.timeout_s * 1000)
    try:
        while tx_left or rx_left:
            ready = poller.poll(timeout_ms)
            if not ready:
                if rx_left:
                    raise PeerTimeout(f"{recv_ch.peer} sent nothing for {recv_ch.timeout_s:.1f} s")
                raise PeerTimeout(f"{send_ch.peer} accepted no data for {send_ch.timeout_s:.1f} s")
            for fd, ev in ready:
                if fd == rfd and rx_left and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    k = _recv_some(recv_ch, rx_view[len(rx_view) - rx_left:])
                    rx_left -= k
                    if rx_left == 0 and rx_hdr is None:  # header complete: validate, then the payload
                        rx_hdr = recv_ch.header_from_buffer()
                        recv_ch.check(rx_hdr, kind, tag)
                        check_fits(rx_hdr, out, recv_ch.peer)
                        rx_view = payload_view(out)
                        rx_left = rx_hdr.nbytes
                    if rx_left == 0:
                        if sfd == rfd:
                            poller.modify(sfd, select.POLLOUT)
                        else:
                            poller.unregister(rfd)
                if fd == sfd and tx_left and ev & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    n = _send_some(send_ch, tx)
                    tx_left -= n
                    _advance(tx, n)
                    if tx_left == 0:
                        if sfd == rfd:
                            if rx_left:
                                poller.modify(sfd, select.POLLIN)
                        else:
                            poller.unregister(sfd)
    except TpiError:
        if tx_left:
            send_ch.tx_broken = True
        raise
    assert rx_hdr is not None
    recv_ch.received(rx_hdr)


def _recv_some(ch: Channel, view: memoryview) -> int:
    """Whatever is there without blocking (0 if nothing); PeerLost on EOF or reset."""
    try:
        k = ch.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:
        raise PeerLost(f"{ch.peer} reset the connection ({e.strerror or e})") from None
    if k == 0:
        raise PeerLost(f"{ch.peer} closed the connection")
    return k


def _send_some(ch: Channel, bufs: list[memoryview]) -> int:
    """As much as the kernel takes without blocking (0 if nothing); PeerLost if the peer is gone."""
    try:
        return ch.sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    except OSError:
        ch.tx_broken = True
        raise ch._pending_error() or PeerLost(f"{ch.peer} closed the connection") from None


def _advance(bufs: list[memoryview], n: int) -> None:
    """Drop the first n bytes from a list of buffers, in place."""
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs.pop(0))
        else:
            bufs[0] = bufs[0][n:]
            n = 0
    while bufs and not len(bufs[0]):
        bufs.pop(0)


# ---------------------------------------------------------------------------------------------------
# Handshake (shared by master<-worker and worker<-worker links)


def _mac(secret: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 over length-prefixed parts (so no two different part lists give the same message)."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def _as_secret(secret: bytes | str | None) -> bytes | None:
    if secret is None or secret == b"" or secret == "":
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _field(msg: dict, name: str, typ: type, peer: str) -> Any:
    value = msg.get(name)
    if type(value) is not typ:
        raise ProtocolError(f"malformed HELLO from {peer}: field '{name}' must be {typ.__name__}, got {value!r}")
    return value


def _refuse(sock: socket.socket, my_rank: int, reason: str) -> TpiError:
    """Tell the joining peer why it is refused (best effort) and return the local error to raise."""
    try:
        payload = json_payload({"reason": reason, "error": "TpiError"})
        send_buffers(sock, header_for(Kind.ERROR, payload, src=my_rank, tag=0), payload_view(payload))
    except TpiError:
        pass
    return TpiError(reason)


def _send_json_raw(sock: socket.socket, kind: int, obj: object, src: int, peer: str) -> None:
    payload = json_payload(obj)
    send_buffers(sock, header_for(kind, payload, src=src, tag=0), payload_view(payload), peer)


def _recv_json_raw(sock: socket.socket, peer: str, *, any_version: bool = False) -> tuple[Header, dict, bytes]:
    hdr, payload = recv_frame(sock, max_nbytes=HANDSHAKE_MAX_NBYTES, peer=peer, any_version=any_version)
    return hdr, parse_json(payload, peer), payload.tobytes()


def _accept_peer(sock: socket.socket, *, my_rank: int, world_size: int, fingerprint: str, secret: bytes | None,
                 allowed: set[int], peer: str) -> tuple[int, dict]:
    """Acceptor side of the handshake; returns (rank, hello). TpiError (peer told why) on refusal."""
    hdr, hello, hello_bytes = _recv_json_raw(sock, peer, any_version=True)
    if hdr.kind != Kind.HELLO:
        raise _refuse(sock, my_rank, f"{peer} sent {Kind(hdr.kind).name} instead of HELLO")
    rank = hello.get("rank")
    who = f"rank {rank} ({peer})" if type(rank) is int else peer
    version = hello.get("version", hdr.version)
    if hdr.version != PROTOCOL_VERSION or version != PROTOCOL_VERSION:
        raise _refuse(sock, my_rank, f"protocol version mismatch: {who} speaks version "
                                     f"{version if hdr.version == PROTOCOL_VERSION else hdr.version}, "
                                     f"rank {my_rank} speaks {PROTOCOL_VERSION}")
    try:
        rank = _field(hello, "rank", int, peer)
        peer_world = _field(hello, "world_size", int, peer)
        peer_fp = _field(hello, "fingerprint", str, peer)
        nonce_j = bytes.fromhex(_field(hello, "nonce", str, peer))
    except (ProtocolError, ValueError) as e:
        raise _refuse(sock, my_rank, f"malformed HELLO from {who}: {e}") from None
    nonce_a = os.urandom(32)
    if secret is not None:
        _send_json_raw(sock, Kind.CHALLENGE, {"nonce": nonce_a.hex()}, my_rank, peer)
        ahdr, auth, _ = _recv_json_raw(sock, who)
        if ahdr.kind == Kind.ERROR:
            raise TpiError(f"{who} gave up authenticating: {auth.get('reason')}")
        expect = _mac(secret, b"join", nonce_a, hello_bytes)
        if ahdr.kind != Kind.AUTH or not hmac.compare_digest(str(auth.get("mac", "")), expect):
            raise _refuse(sock, my_rank, f"authentication failed for {who}: wrong shared secret")
    if peer_world != world_size:
        raise _refuse(sock, my_rank, f"world size mismatch: {who} has world_size {peer_world}, "
                                     f"rank {my_rank} has {world_size}")
    if peer_fp != fingerprint:
        raise _refuse(sock, my_rank, f"model fingerprint mismatch: {who} has {peer_fp!r}, "
                                     f"rank {my_rank} has {fingerprint!r}")
    if not 1 <= rank < world_size:
        raise _refuse(sock, my_rank, f"rank {rank} out of range: expected 1..{world_size - 1}")
    if rank not in allowed:
        raise _refuse(sock, my_rank, f"rank {rank} already joined (or not expected by rank {my_rank})")
    proof = _mac(secret, b"accept", nonce_j, nonce_a, hello_bytes, str(my_rank).encode()) if secret else None
    _send_json_raw(sock, Kind.WELCOME, {"rank": my_rank, "nonce": nonce_a.hex(), "proof": proof}, my_rank, peer)
    return rank, hello


def _join_peer(sock: socket.socket, *, rank: int, world_size: int, fingerprint: str, secret: bytes | None,
               expect_rank: int, listen: tuple[str, int] | None) -> dict:
    """Joiner side of the handshake; returns the WELCOME. TpiError with the acceptor's reason on refusal."""
    peer = f"rank {expect_rank}"
    nonce_j = os.urandom(32)
    hello = {"version": PROTOCOL_VERSION, "world_size": world_size, "rank": rank, "fingerprint": fingerprint,
             "nonce": nonce_j.hex(), "listen": list(listen) if listen else None}
    payload = json_payload(hello)
    hello_bytes = payload.tobytes()
    send_buffers(sock, header_for(Kind.HELLO, payload, src=rank, tag=0), payload_view(payload), peer)
    nonce_a = b""
    while True:
        hdr, msg, _ = _recv_json_raw(sock, peer)
        if hdr.kind == Kind.ERROR:
            raise TpiError(f"{peer} refused rank {rank}: {msg.get('reason', 'no reason given')}")
        if hdr.kind == Kind.CHALLENGE:
            if secret is None:
                _refuse(sock, rank, f"rank {rank} has no shared secret")
                raise TpiError(f"{peer} requires a shared secret and rank {rank} has none")
            try:
                nonce_a = bytes.fromhex(str(msg.get("nonce", "")))
            except ValueError:
                raise ProtocolError(f"{peer} sent a malformed CHALLENGE") from None
            _send_json_raw(sock, Kind.AUTH, {"mac": _mac(secret, b"join", nonce_a, hello_bytes)}, rank, peer)
        elif hdr.kind == Kind.WELCOME:
            break
        else:
            raise ProtocolError(f"{peer} sent {Kind(hdr.kind).name} during the handshake")
    if msg.get("rank") != expect_rank:
        raise TpiError(f"expected rank {expect_rank} at this address, found rank {msg.get('rank')}")
    if secret is not None:
        expect = _mac(secret, b"accept", nonce_j, nonce_a, hello_bytes, str(expect_rank).encode())
        if not nonce_a or not hmac.compare_digest(str(msg.get("proof") or ""), expect):
            _refuse(sock, rank, f"rank {expect_rank} did not prove the shared secret to rank {rank}")
            raise TpiError(f"{peer} did not prove the shared secret; refusing to trust it")
    return msg


def open_listener(host: str = "127.0.0.1", port: int = 0, backlog: int = 64) -> socket.socket:
    """A listening TCP socket (port 0 = ephemeral; read the real one from `getsockname()`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise TpiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # tiny frames must not wait for Nagle


def _accept(lst: socket.socket, timeout_s: float) -> tuple[socket.socket | None, Any]:
    """One accepted connection, or (None, None) if nobody came within timeout_s."""
    lst.settimeout(timeout_s)
    try:
        conn, addr = lst.accept()
    except socket.timeout:
        return None, None
    except OSError as e:
        raise TpiError(f"accepting connections on {lst.getsockname()[:2]} failed: {e.strerror or e}") from None
    _tune(conn)
    return conn, addr


def _connect(addr: tuple[str, int], deadline: float, peer: str) -> socket.socket:
    """Connect, retrying refused/unreachable attempts until the deadline (the peer may not listen yet)."""
    delay = 0.01
    while True:
        remaining = deadline - time.monotonic()
        try:
            sock = socket.create_connection(addr, timeout=max(remaining, 0.01))
            _tune(sock)
            return sock
        except OSError as e:
            if time.monotonic() + delay >= deadline:
                raise TpiError(f"could not reach {peer} at {addr[0]}:{addr[1]}: {e.strerror or e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _parse_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise TpiError(f"bad master address {addr!r}: expected host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


# ---------------------------------------------------------------------------------------------------


class Group:
    """This rank's view of the device group: `rank`, `world_size`, `channels` (peer rank -> Channel)."""

    def __init__(self, rank: int, world_size: int, channels: dict[int, Channel], *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, mesh: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.channels = channels
        self.timeout_s = timeout_s
        self.mesh = mesh
        self.closed = False
        self._seq = 0
        self._hook: LinkHook | None = None
        self._scratch: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world_size={self.world_size}, peers={sorted(self.channels)})"

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def link_hook(self) -> LinkHook | None:
        return self._hook

    @link_hook.setter
    def link_hook(self, hook: LinkHook | None) -> None:
        self._hook = hook
        for ch in self.channels.values():
            ch.link_hook = hook

    def channel(self, peer: int) -> Channel:
        ch = self.channels.get(peer)
        if ch is None:
            if self.closed:
                raise TpiError(f"rank {self.rank}: the group is closed")
            raise TpiError(f"rank {self.rank} has no link to rank {peer} "
                           f"(ring and tree need a full mesh: build the group with mesh=True)")
        return ch

    def next_tag(self) -> int:
        """Sequence number of the next collective; every rank calls collectives in the same order."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def scratch(self, n: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """A reusable 1-d receive buffer of at least n items (grows, never shrinks); slice it to size."""
        key = np.dtype(dtype).str
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = self._scratch[key] = np.empty(n, dtype)
        return buf

    def abort(self, error: BaseException) -> None:
        """Tell every reachable peer why this rank gives up (ERROR frame, bounded wait), then close."""
        if self.closed:
            return
        reason = getattr(error, "reason", None) or str(error)
        name = type(error).__name__ if type(error).__name__ in _ERROR_CLASSES else "TpiError"
        for ch in self.channels.values():
            ch.send_error(reason, name)
        self.close(bye=False)

    def close(self, bye: bool = True) -> None:
        """Close every socket. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for ch in self.channels.values():
            ch.close(bye=bye)
        self.channels = {}

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def master(cls, world_size: int, host: str = "127.0.0.1", port: int = 0, *, secret: bytes | str | None = None,
               fingerprint: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, mesh: bool = True,
               listener: socket.socket | None = None, max_nbytes: int = DEFAULT_MAX_NBYTES) -> Group:
        """Rank 0: wait (until `timeout_s`) for ranks 1..N-1 to join, then wire the mesh if asked.

        Peers that fail the handshake are told why, logged, and dropped; the master keeps waiting for
        valid ones until its deadline. `listener` (from `open_listener`, e.g. to learn an ephemeral port
        before workers start) is taken over and closed when the rendezvous ends.
        """
        if world_size < 1:
            raise TpiError(f"world_size must be >= 1, got {world_size}")
        secret_b = _as_secret(secret)
        deadline = time.monotonic() + timeout_s
        lst = listener if listener is not None else open_listener(host, port)
        joined: dict[int, tuple[socket.socket, dict]] = {}
        channels: dict[int, Channel] = {}
        last_refusal = ""
        try:
            if world_size > 1:
                log.info("master listening on %s:%d for %d workers", *lst.getsockname()[:2], world_size - 1)
            while len(joined) < world_size - 1:
                remaining = deadline - time.monotonic()
                missing = sorted(set(range(1, world_size)) - joined.keys())
                if remaining <= 0:
                    hint = f"; last refusal: {last_refusal}" if last_refusal else ""
                    raise TpiError(f"timed out after {timeout_s:.1f} s waiting for workers; "
                                   f"missing rank(s) {', '.join(map(str, missing))}{hint}")
                conn, addr = _accept(lst, remaining)
                if conn is None:
                    continue
                conn.settimeout(min(remaining, timeout_s))
                peer = f"peer {addr[0]}:{addr[1]}"
                try:
                    rank, hello = _accept_peer(conn, my_rank=0, world_size=world_size, fingerprint=fingerprint,
                                               secret=secret_b, allowed=set(missing), peer=peer)
                except TpiError as e:
                    last_refusal = str(e)
                    log.warning("master refused %s: %s", peer, e)
                    conn.close()
                    continue
                joined[rank] = (conn, hello)
                log.info("rank %d joined from %s", rank, peer)
            for rank, (conn, _) in joined.items():
                channels[rank] = Channel(conn, rank=0, peer_rank=rank, timeout_s=timeout_s, max_nbytes=max_nbytes)
            hellos = {rank: hello for rank, (_, hello) in joined.items()}
            joined.clear()
            peers = {str(rank): hello.get("listen") for rank, hello in hellos.items()} if mesh else {}
            for ch in channels.values():
                ch.send_json(Kind.CONTROL, {"mesh": mesh, "peers": peers})
            for rank, ch in channels.items():  # a worker that failed to wire the mesh answers with ERROR
                if not ch.recv_json(Kind.CONTROL).get("ready"):
                    raise ProtocolError(f"rank {rank} sent an unexpected control message instead of 'ready'")
            log.info("group of %d ready (mesh=%s)", world_size, mesh)
            return cls(0, world_size, channels, timeout_s=timeout_s, mesh=mesh)
        except BaseException:
            for conn, _ in joined.values():
                conn.close()
            for ch in channels.values():
                ch.close(bye=False)
            raise
        finally:
            lst.close()

    @classmethod
    def worker(cls, rank: int, master_addr: str | tuple[str, int], *, world_size: int,
               secret: bytes | str | None = None, fingerprint: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
               max_nbytes: int = DEFAULT_MAX_NBYTES) -> Group:
        """Rank 1..N-1: join the master at `master_addr` ("host:port" or a tuple), retrying until `timeout_s`.

        Raises TpiError with the master's reason when refused (wrong secret, version, world size, rank,
        fingerprint). When the master asks for a mesh, listens on an ephemeral port of the interface that
        reaches the master, connects to every higher rank and accepts every lower one.
        """
        if not 1 <= rank < world_size:
            raise TpiError(f"worker rank must be in 1..{world_size - 1} for world_size {world_size}, got {rank}")
        secret_b = _as_secret(secret)
        host, port = _parse_addr(master_addr)
        sock = _connect((host, port), time.monotonic() + timeout_s, "master")
        channels: dict[int, Channel] = {}
        mesh_lst: socket.socket | None = None
        try:
            sock.settimeout(timeout_s)
            mesh_lst = open_listener(sock.getsockname()[0], 0)
            _join_peer(sock, rank=rank, world_size=world_size, fingerprint=fingerprint, secret=secret_b,
                       expect_rank=0, listen=mesh_lst.getsockname()[:2])
            master = channels[0] = Channel(sock, rank=rank, peer_rank=0, timeout_s=timeout_s, max_nbytes=max_nbytes)
            info = master.recv_json(Kind.CONTROL)  # sent once every rank has joined
            mesh = bool(info.get("mesh"))
            if mesh:
                try:
                    cls._wire_mesh(rank, world_size, info.get("peers"), mesh_lst, channels, secret=secret_b,
                                   fingerprint=fingerprint, timeout_s=timeout_s, max_nbytes=max_nbytes)
                except TpiError as e:
                    master.send_error(f"rank {rank} could not join the mesh: {e}")
                    raise
            master.send_json(Kind.CONTROL, {"ready": True})
            return cls(rank, world_size, channels, timeout_s=timeout_s, mesh=mesh)
        except BaseException:
            if 0 not in channels:
                sock.close()
            for ch in channels.values():
                ch.close(bye=False)
            raise
        finally:
            if mesh_lst is not None:
                mesh_lst.close()

    @staticmethod
    def _wire_mesh(rank: int, world_size: int, peers: object, lst: socket.socket, channels: dict[int, Channel], *,
                   secret: bytes | None, fingerprint: str, timeout_s: float, max_nbytes: int) -> None:
        """Connect to every higher worker rank, accept every lower one (rank N-1 only accepts, so no cycle)."""
        if not isinstance(peers, dict):
            raise ProtocolError(f"master sent peers {peers!r}, expected an object")
        deadline = time.monotonic() + timeout_s
        for peer in range(rank + 1, world_size):
            addr = peers.get(str(peer))
            if not (isinstance(addr, list) and len(addr) == 2 and isinstance(addr[0], str)
                    and type(addr[1]) is int):
                raise ProtocolError(f"master sent no usable address for rank {peer}: {addr!r}")
            s = _connect((addr[0], addr[1]), deadline, f"rank {peer}")
            try:
                s.settimeout(timeout_s)
                _join_peer(s, rank=rank, world_size=world_size, fingerprint=fingerprint, secret=secret,
                           expect_rank=peer, listen=None)
            except BaseException:
                s.close()
                raise
            channels[peer] = Channel(s, rank=rank, peer_rank=peer, timeout_s=timeout_s, max_nbytes=max_nbytes)
        expected = set(range(1, rank))
        while expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TpiError(f"timed out after {timeout_s:.1f} s waiting for rank(s) "
                               f"{', '.join(map(str, sorted(expected)))} to connect to rank {rank}")
            conn, addr = _accept(lst, remaining)
            if conn is None:
                continue
            conn.settimeout(min(remaining, timeout_s))
            try:
                peer_rank, _ = _accept_peer(conn, my_rank=rank, world_size=world_size, fingerprint=fingerprint,
                                            secret=secret, allowed=set(expected), peer=f"peer {addr[0]}:{addr[1]}")
            except TpiError as e:
                log.warning("rank %d refused a mesh peer: %s", rank, e)
                conn.close()
                continue
            expected.discard(peer_rank)
            channels[peer_rank] = Channel(conn, rank=rank, peer_rank=peer_rank, timeout_s=timeout_s,
                                          max_nbytes=max_nbytes)

    @classmethod
    def local(cls, world_size: int, *, mesh: bool = True, secret: bytes | str | None = None,
              fingerprint: str = "local", timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Group]:
        """All ranks of a group in this process (one thread per worker during setup), over TCP loopback.

        Returns the groups indexed by rank; close each (or use them as context managers).
        """
        lst = open_listener("127.0.0.1", 0)
        addr = lst.getsockname()[:2]
        groups: list[Group | None] = [None] * world_size
        errors: list[tuple[int, BaseException]] = []

        def join(rank: int) -> None:
            try:
                groups[rank] = cls.worker(rank, addr, world_size=world_size, secret=secret,
                                          fingerprint=fingerprint, timeout_s=timeout_s)
            except BaseException as e:  # reported below, from the calling thread
                errors.append((rank, e))

        threads = [threading.Thread(target=join, args=(r,), daemon=True, name=f"tpi-join-{r}")
                   for r in range(1, world_size)]
        for t in threads:
            t.start()
        try:
            groups[0] = cls.master(world_size, secret=secret, fingerprint=fingerprint, timeout_s=timeout_s,
                                   mesh=mesh, listener=lst)
        except BaseException as e:
            errors.insert(0, (0, e))
        for t in threads:
            t.join(timeout_s)
        if errors or any(g is None for g in groups):
            for g in groups:
                if g is not None:
                    g.close()
            if errors:
                raise errors[0][1]
            raise TpiError(f"local group of {world_size} did not come up within {timeout_s:.1f} s")
        return groups  # type: ignore[return-value]


def run_local_processes(world_size: int, fn: Callable[[Group], Any], *, mesh: bool = True,
                        secret: bytes | str | None = None, fingerprint: str = "local",
                        timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float | None = None,
                        return_errors: bool = False) -> list[Any]:
    """Fork one process per rank, build the group over TCP loopback, return `fn(group)` per rank.

    For tests and benchmarks. Results come back through a pipe per child (local IPC, not the wire). A
    rank that raises or dies yields its exception (`return_errors=True`) or re-raises the first failure.
    Children still running after `wait_s` (default 2 x timeout_s + 10) are killed.
    """
    import multiprocess as mp  # heavy-ish; only tests and benchmarks need it
    from multiprocess.connection import wait

    ctx = mp.get_context("fork")
    lst = open_listener("127.0.0.1", 0)
    addr = lst.getsockname()[:2]
    procs, readers = [], []
    try:
        for rank in range(world_size):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, args=(rank, world_size, addr, lst, fn, w, mesh, secret,
                                                      fingerprint, timeout_s), daemon=True, name=f"tpi-rank-{rank}")
            p.start()
            w.close()
            procs.append(p)
            readers.append(r)
    finally:
        lst.close()  # rank 0 holds its own copy
    results: dict[int, tuple[str, Any]] = {}
    wait_s = wait_s if wait_s is not None else 2 * timeout_s + 10.0
    deadline = time.monotonic() + wait_s
    pending = dict(enumerate(readers))
    while pending and time.monotonic() < deadline:
        for r in wait(list(pending.values()), timeout=max(deadline - time.monotonic(), 0.0)):
            rank = next(k for k, v in pending.items() if v is r)
            try:
                results[rank] = r.recv()
            except (EOFError, OSError):
                results[rank] = ("died", None)
            r.close()
            del pending[rank]
    for r in pending.values():
        r.close()
    out: list[Any] = []
    for rank, p in enumerate(procs):
        p.join(0.5 if rank not in pending else 0.0)
        if p.is_alive():
            p.kill()
            p.join()
        status, value = results.get(rank, ("late", None))
        if status == "ok":
            out.append(value)
        elif status == "err":
            out.append(value if isinstance(value, BaseException) else TpiError(str(value)))
        elif status == "died":
            out.append(TpiError(f"rank {rank} exited with code {p.exitcode} without a result"))
        else:
            out.append(TpiError(f"rank {rank} gave no result within {wait_s:.1f} s (killed)"))
    if not return_errors:
        for value in out:
            if isinstance(value, BaseException):
                raise value
    return out


def _child_main(rank: int, world_size: int, addr: tuple[str, int], lst: socket.socket, fn: Callable[[Group], Any],
                conn: Any, mesh: bool, secret: bytes | str | None, fingerprint: str, timeout_s: float) -> None:
    try:
        if rank == 0:
            group = Group.master(world_size, secret=secret, fingerprint=fingerprint, timeout_s=timeout_s,
                                 mesh=mesh, listener=lst)
        else:
            lst.close()
            group = Group.worker(rank, addr, world_size=world_size, secret=secret, fingerprint=fingerprint,
                                 timeout_s=timeout_s)
        with group:
            result = fn(group)
        conn.send(("ok", result))
    except BaseException as e:
        try:
            conn.send(("err", e))
        except Exception:
            conn.send(("err", TpiError(f"rank {rank}: {type(e).__name__}: {e}")))
    finally:
        conn.close()
