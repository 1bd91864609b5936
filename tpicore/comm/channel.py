"""One peer: whole frames over one TCP socket, sealed when the handshake agreed keys, every wait bounded.

Owns the socket loops (`recv_into`, `send_buffers`), `Channel` (typed send/recv of arrays and JSON to one
peer, preallocated receive buffers, the link hook) and the project's one timeout default. Does not
handshake (handshake.py), does not know the group (group.py), does not pump two directions at once
(duplex.py), and lays out no bytes itself (frame.py, seal.py).

    send_array(kind, arr)                                    recv_into(out) / recv_array()
      | t_send = hook.now()                                    | hook.on_wait(src, dst)   (about to block;
      |                                                        |   no hook: Spin polls, then blocks)
      | t_deliver = hook.on_send(src, dst, wire_nbytes)        | header (40, or 56 sealed): open, validate,
      | header [+ stamps if either is non-zero] + payload      |   check sender, kind, tag, shape
      | sealed: header part, body part (seal.py)               | body: straight into `out` (plain) or into a
      +---- sendmsg, no concatenated copy ------- TCP -------> |   reused buffer, opened into `out` (sealed)
                                                               | hook.on_recv(src, dst, wire_nbytes, stamps)

The link hook is the emulator's seam (emulator/net/shaper.py implements it). Its default, NO_LINK_HOOK,
does nothing and stamps nothing: a real run pays one identity check per frame and no bytes (stamps travel
only as the optional extension). ERROR and BYE frames bypass the hook: failure reports must not queue
behind emulated links.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Protocol

import numpy as np

from tpicore.comm.frame import (
    DEFAULT_MAX_NBYTES,
    HEADER_NBYTES,
    NO_STAMPS,
    STAMPED,
    STAMPS_NBYTES,
    TAG_NBYTES,
    CommError,
    Header,
    Kind,
    ProtocolError,
    Stamps,
    VersionMismatch,
    check_fits,
    contiguous,
    header_for,
    json_payload,
    numpy_dtype,
    pack_stamps,
    parse_json,
    payload_view,
    unpack_header,
    unpack_stamps,
    wire_nbytes,
)
from tpicore.comm.seal import PART_BODY, PART_HEADER, FrameCipher, TamperedFrame
from tpicore.errors import TpiError

DEFAULT_TIMEOUT_S = 60.0  # the project's one default for "a peer sent nothing for this long"
SMALL_FRAME_NBYTES = 64 << 10  # ERROR frames and handshake messages stay small
_ABORT_SEND_TIMEOUT_S = 0.5
SPIN_S = 50e-6  # a receive polls this long before it blocks, where spin_budget_s allows it
SPIN_BACKOFF_MAX = 256  # after failed spins, up to this many receives block at once
SPIN_LOAD_CHECK = 256  # receives between two looks at the host's load average


class PeerLost(CommError):
    """The peer closed or reset the connection."""


class PeerTimeout(CommError):
    """The peer sent (or accepted) nothing for the whole timeout."""


class ControlMessage(ProtocolError):
    """A control message (`message`) arrived where data was expected: a protocol error, unless the receiver
    knows it (e.g. the master regrouping after a lost device, tpicore.dist.failover)."""

    def __init__(self, message: dict, expected: str, peer: str) -> None:
        super().__init__(f"expected {expected} from {peer}, got CONTROL {message.get('op')!r}")
        self.message = message


ERROR_CLASSES: dict[str, type[CommError]] = {
    "PeerLost": PeerLost, "PeerTimeout": PeerTimeout, "ProtocolError": ProtocolError, "TamperedFrame": TamperedFrame}


class LinkHook(Protocol):
    """What the emulator implements to shape traffic (see the module docstring)."""

    def now(self) -> float: ...

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float: ...

    # called before a receive blocks: until that frame is in, this rank sends nothing (virtual time needs it)
    def on_wait(self, src_rank: int, dst_rank: int) -> None: ...

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None: ...


class NoLinkHook:
    """The default link hook: frames go out at once, unstamped."""

    def now(self) -> float:
        return 0.0

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        return 0.0

    def on_wait(self, src_rank: int, dst_rank: int) -> None:
        return None

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None:
        return None


NO_LINK_HOOK = NoLinkHook()


# ---------------------------------------------------------------------------------------------------
# Socket loops. `peer` is how errors name the other end ("rank 3", "peer 127.0.0.1:5000").


_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec} on 64-bit Linux/macOS


def set_kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Blocking socket whose recv/send give up after `timeout_s` idle (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeouts poll() before every recv/send: two syscalls per operation. Kernel
    timeouts keep one, and the loops below map the resulting EAGAIN to PeerTimeout all the same.
    """
    sec = int(timeout_s)
    tv = _TIMEVAL.pack(sec, int(round((timeout_s - sec) * 1e6)))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _timeout_text(sock: socket.socket, opt: int = socket.SO_RCVTIMEO) -> str:
    t = sock.gettimeout()
    if t is None:  # kernel timeouts (only read back on the error path)
        try:
            sec, usec = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, _TIMEVAL.size))
            t = sec + usec / 1e6
        except OSError:
            return "the timeout"
    return f"{t:.1f} s"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def spin_budget_s(n_processes: int, spin_s: float = SPIN_S) -> float:
    """How long a receive may poll before blocking when `n_processes` share this host: `spin_s` while
    every process can have a core of its own, else 0 (a spinning rank would steal the core of the
    rank it waits for)."""
    return spin_s if n_processes <= usable_cores() else 0.0


def spin_recv(sock: socket.socket, view: memoryview, spin_s: float, peer: str) -> int:
    """Non-blocking reads into `view` for up to `spin_s`: the bytes that came (0: none yet, so block).

    Waking a blocked reader costs a scheduler round trip (~10 us a hop on loopback); a frame that
    arrives within the spin skips it. The spin does not yield the CPU: on a busy host a yield hands
    the core to another process for a whole time slice; a peer that shares this core cannot send
    until the spin ends, and Spin's backoff then stops spinning. Returns at the first bytes, whatever
    their number.
    """
    deadline = time.perf_counter() + spin_s
    n = len(view)
    while True:
        try:
            k = sock.recv_into(view, n, socket.MSG_DONTWAIT)
        except (BlockingIOError, socket.timeout):  # nothing yet (OSError subclasses: caught first)
            if time.perf_counter() >= deadline:
                return 0
            continue
        except (ConnectionResetError, ConnectionAbortedError):
            raise PeerLost(f"{peer} reset the connection") from None
        except OSError as e:
            raise PeerLost(f"connection to {peer} failed: {e.strerror or e}") from None
        if k == 0:
            raise PeerLost(f"{peer} closed the connection")
        return k


class Spin:
    """A channel's receive polling: `spin_s` per header read (0: block at once), with a backoff. A spin
    that catches nothing makes the next 1, 2, 4 .. SPIN_BACKOFF_MAX reads block at once (a busy host:
    polling would only burn a core); one that catches a frame resets it. Every SPIN_LOAD_CHECK reads it
    looks at the host's load average: with more runnable processes than cores (plus one, for this
    group's own waiting ranks) it blocks at once, whoever runs them (measured: a spin then costs more
    than the wakeup it saves, benchmarks/bench_allreduce.py)."""

    def __init__(self, spin_s: float = 0.0, check_load: bool = True) -> None:
        self.spin_s = spin_s
        self.backoff = 0
        self.skip = 0  # reads left that block at once
        self.busy = False  # the host had more runnable processes than cores at the last check
        self.check_load = check_load
        self._until_check = 0
        self._cores = usable_cores()

    def poll(self, sock: socket.socket, view: memoryview, peer: str) -> int:
        """spin_recv unless backing off or the host is busy: the bytes caught."""
        self._until_check -= 1
        if self._until_check <= 0 and self.check_load:
            self._until_check = SPIN_LOAD_CHECK
            self.busy = os.getloadavg()[0] >= self._cores + 1
        if self.skip or self.busy:
            self.skip = max(0, self.skip - 1)
            return 0
        got = spin_recv(sock, view, self.spin_s, peer)
        self.backoff = 0 if got else min(2 * self.backoff or 1, SPIN_BACKOFF_MAX)
        self.skip = self.backoff
        return got


def recv_into(sock: socket.socket, view: memoryview, peer: str = "peer", got: int = 0) -> None:
    """Fill `view` completely (recv may return fewer bytes); PeerLost on EOF, PeerTimeout when idle.
    `got`: bytes already in `view` (a spin_recv's)."""
    n = len(view)
    while got < n:
        try:  # MSG_WAITALL: one wakeup for a whole payload on blocking sockets, harmless otherwise
            k = sock.recv_into(view[got:] if got else view, 0, socket.MSG_WAITALL)
        except (socket.timeout, BlockingIOError):
            where = f" mid-frame ({got} of {n} bytes)" if got else ""
            raise PeerTimeout(f"{peer} sent nothing for {_timeout_text(sock)}{where}") from None
        except (ConnectionResetError, ConnectionAbortedError):
            raise PeerLost(f"{peer} reset the connection") from None
        except OSError as e:
            raise PeerLost(f"connection to {peer} failed: {e.strerror or e}") from None
        if k == 0:
            raise PeerLost(f"{peer} closed the connection")
        got += k


def send_buffers(sock: socket.socket, bufs: list[bytes | memoryview], peer: str = "peer") -> None:
    """Send the buffers in order with sendmsg (no concatenated copy), finishing any partial send."""
    try:
        sent = sock.sendmsg(bufs)
        for buf in bufs:
            if sent >= len(buf):
                sent -= len(buf)
                continue
            sock.sendall(memoryview(buf)[sent:])
            sent = 0
    except (socket.timeout, BlockingIOError):
        raise PeerTimeout(f"{peer} accepted no data for {_timeout_text(sock, socket.SO_SNDTIMEO)}") from None
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        raise PeerLost(f"{peer} closed the connection") from None
    except OSError as e:
        raise PeerLost(f"connection to {peer} failed: {e.strerror or e}") from None


def send_frame(sock: socket.socket, kind: int, arr: np.ndarray, *, src: int = 0, tag: int = 0, flags: int = 0,
               peer: str = "peer") -> None:
    """Send one plain frame (handshakes and tests; a Channel seals and stamps its own)."""
    arr = contiguous(arr)
    send_buffers(sock, [header_for(kind, arr, src=src, tag=tag, flags=flags), payload_view(arr)], peer)


def recv_frame(sock: socket.socket, *, max_nbytes: int = DEFAULT_MAX_NBYTES, peer: str = "peer",
               any_version: bool = False) -> tuple[Header, np.ndarray]:
    """Receive one plain, unstamped frame into new memory (handshakes and tests)."""
    buf = bytearray(HEADER_NBYTES)
    recv_into(sock, memoryview(buf), peer)
    try:
        hdr = unpack_header(buf, max_nbytes, any_version=any_version)
    except VersionMismatch:
        raise
    except ProtocolError as e:
        raise ProtocolError(f"from {peer}: {e}") from None
    if hdr.flags & STAMPED:
        raise ProtocolError(f"from {peer}: a timestamp extension outside a data channel")
    out = np.empty(hdr.shape, dtype=numpy_dtype(hdr.dtype))
    if hdr.nbytes:
        recv_into(sock, payload_view(out), peer)
    return hdr, out


def remote_error(payload: np.ndarray, peer: str) -> CommError:
    """The exception an ERROR frame stands for, keeping the original reason for forwarding."""
    msg = parse_json(payload, peer)
    reason = str(msg.get("reason", "no reason given"))
    cls = ERROR_CLASSES.get(str(msg.get("error")), CommError)
    return cls(f"{reason} (reported by {peer})", reason=reason)


class Channel:
    """One TCP connection to one peer: framed arrays and JSON, every wait bounded by `timeout_s`.

    `cipher` (from the handshake) seals every frame; None sends plain frames (loopback only).
    """

    def __init__(self, sock: socket.socket, *, rank: int, peer_rank: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_nbytes: int = DEFAULT_MAX_NBYTES, cipher: FrameCipher | None = None) -> None:
        self.sock = sock
        self.rank = rank
        self.peer_rank = peer_rank
        self.peer = f"rank {peer_rank}"
        self.timeout_s = timeout_s
        self.max_nbytes = max_nbytes
        self.link_hook: LinkHook = NO_LINK_HOOK
        self.spin = Spin()  # how long a header read polls before it blocks (collectives set it)
        self.tx_broken = False  # a send stopped mid-frame: nothing more may go out on this stream
        self.cipher = cipher
        if cipher is not None:
            cipher.opener.peer = self.peer
        self.sealed = cipher is not None
        self._wire_hdr = bytearray(HEADER_NBYTES + (TAG_NBYTES if self.sealed else 0))  # as received
        self._hdr = bytearray(HEADER_NBYTES) if self.sealed else self._wire_hdr  # opened
        self._wire_hdr_view = memoryview(self._wire_hdr)
        self._stamps = bytearray(STAMPS_NBYTES)
        self._tx_hdr = memoryview(bytearray(HEADER_NBYTES + TAG_NBYTES))  # a sealed header, reused
        self._tx = bytearray(0)  # sealed bodies, grown on demand and reused
        self._rx = bytearray(0)
        self._rx_plain = bytearray(0)  # a sealed body with stamps is opened here, then split
        set_kernel_timeouts(sock, timeout_s)

    def __repr__(self) -> str:
        return f"Channel(rank {self.rank} <-> {self.peer}, {'sealed' if self.sealed else 'plain'})"

    def set_timeout(self, timeout_s: float) -> None:
        """A new bound on every wait of this channel from now on."""
        self.timeout_s = timeout_s
        set_kernel_timeouts(self.sock, timeout_s)

    def relabel(self, rank: int | None = None, peer_rank: int | None = None) -> None:
        """New ranks for both ends after a regroup (tpicore.dist.failover): frames from here on carry them.
        Both ends switch at the same message (the master after sending an assignment, the worker on
        receiving it), so no frame in flight is misjudged."""
        if rank is not None:
            self.rank = rank
        if peer_rank is not None:
            self.peer_rank = peer_rank
            self.peer = f"rank {peer_rank}"
            if self.cipher is not None:
                self.cipher.opener.peer = self.peer

    # -- sending ---------------------------------------------------------------------------------------
    def frame(self, kind: int, arr: np.ndarray, tag: int, *, hook: bool = True) -> list[bytes | memoryview]:
        """The wire buffers of one frame carrying the C-contiguous `arr`, stamped by the link hook."""
        stamps, flags = NO_STAMPS, 0
        h = self.link_hook
        if hook and h is not NO_LINK_HOOK:  # the default costs this one check
            t_send = h.now()
            stamps = Stamps(t_send, h.on_send(self.rank, self.peer_rank, wire_nbytes(arr.nbytes, self.sealed)))
            flags = STAMPED if stamps != NO_STAMPS else 0
        header = header_for(kind, arr, src=self.rank, tag=tag, flags=flags)
        payload = payload_view(arr)
        cipher = self.cipher
        if cipher is None:
            return [header, pack_stamps(stamps), payload] if flags else [header, payload]
        s = cipher.sealer
        s.seal_into(PART_HEADER, header, self._tx_hdr)
        bufs: list[bytes | memoryview] = [self._tx_hdr]
        body: bytes | memoryview = pack_stamps(stamps) + payload.tobytes() if flags else payload
        if len(body):
            if len(self._tx) < len(body) + TAG_NBYTES:
                self._tx = bytearray(len(body) + TAG_NBYTES)
            out = memoryview(self._tx)[: len(body) + TAG_NBYTES]
            s.seal_into(PART_BODY, body, out)
            bufs.append(out)
        s.advance()
        return bufs

    def send_array(self, kind: int, arr: np.ndarray, tag: int = 0) -> None:
        """Send one array (copied only if not C-contiguous)."""
        self.send_bufs(self.frame(kind, contiguous(arr), tag))

    def send_bufs(self, bufs: list[bytes | memoryview]) -> None:
        try:
            send_buffers(self.sock, bufs, self.peer)
        except PeerLost as e:
            self.tx_broken = True
            raise self.pending_error() or e.at(self.peer_rank) from None
        except PeerTimeout as e:
            self.tx_broken = True
            raise e.at(self.peer_rank)
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
            send_buffers(self.sock, self.frame(Kind.ERROR, json_payload({"reason": reason, "error": error}), 0,
                                               hook=False), self.peer)
        except (TpiError, OSError):
            self.tx_broken = True

    # -- receiving: header, then body; `exchange` drives the same steps without blocking ------------------
    def header_view(self) -> memoryview:
        """Where the next frame's header lands (sealed or not)."""
        return self._wire_hdr_view

    def header_in(self) -> Header:
        """Open and validate the header sitting in `header_view()`; checks who sent it."""
        if self.cipher is not None:
            self.cipher.opener.open_into(PART_HEADER, self._wire_hdr, self._hdr)
        try:
            hdr = unpack_header(self._hdr, self.max_nbytes)
        except ProtocolError as e:
            raise ProtocolError(f"from {self.peer}: {e}") from None
        if hdr.src != self.peer_rank:
            raise ProtocolError(f"{self.peer} sent a frame claiming to be from rank {hdr.src}")
        return hdr

    def body_views(self, hdr: Header, dst: memoryview) -> list[memoryview]:
        """Where the body of `hdr`'s frame lands: straight into `dst` when plain, else a reused buffer."""
        n_stamps = STAMPS_NBYTES if hdr.flags & STAMPED else 0
        if self.cipher is None:
            views = [memoryview(self._stamps)] if n_stamps else []
            return views + [dst] if hdr.nbytes else views
        n = n_stamps + hdr.nbytes
        if not n:
            return []
        if len(self._rx) < n + TAG_NBYTES:
            self._rx = bytearray(n + TAG_NBYTES)
        return [memoryview(self._rx)[: n + TAG_NBYTES]]

    def body_in(self, hdr: Header, dst: memoryview) -> Stamps:
        """The body is in: open it into `dst` (sealed) and return the frame's stamps."""
        stamped = hdr.flags & STAMPED
        cipher = self.cipher
        if cipher is not None:
            n = (STAMPS_NBYTES if stamped else 0) + hdr.nbytes
            if n and not stamped:
                cipher.opener.open_into(PART_BODY, memoryview(self._rx)[: n + TAG_NBYTES], dst)
            elif n:
                if len(self._rx_plain) < n:
                    self._rx_plain = bytearray(n)
                plain = memoryview(self._rx_plain)[:n]
                cipher.opener.open_into(PART_BODY, memoryview(self._rx)[: n + TAG_NBYTES], plain)
                self._stamps[:] = plain[:STAMPS_NBYTES]
                dst[:] = plain[STAMPS_NBYTES:]
            cipher.opener.advance()
        return unpack_stamps(self._stamps) if stamped else NO_STAMPS

    def delivered(self, hdr: Header, stamps: Stamps) -> None:
        """A data frame is fully in: the link hook may hold it until its delivery time."""
        if self.link_hook is not NO_LINK_HOOK:
            self.link_hook.on_recv(hdr.src, self.rank, wire_nbytes(hdr.nbytes, self.sealed), *stamps)

    def check(self, hdr: Header, kind: int, tag: int | None) -> None:
        """Raise what an ERROR/BYE frame stands for, or ProtocolError for the wrong kind or tag."""
        if hdr.kind == Kind.ERROR:
            if hdr.nbytes > SMALL_FRAME_NBYTES:
                raise ProtocolError(f"{self.peer} sent an ERROR frame of {hdr.nbytes} bytes")
            raise remote_error(self._read_body(hdr)[0], self.peer)
        if hdr.kind == Kind.BYE:
            raise PeerLost(f"{self.peer} left the group").at(self.peer_rank)
        if hdr.kind == Kind.CONTROL and kind != Kind.CONTROL and hdr.nbytes <= SMALL_FRAME_NBYTES:
            raise ControlMessage(parse_json(self._read_body(hdr)[0], self.peer), Kind(kind).name, self.peer)
        if hdr.kind != kind:
            raise ProtocolError(f"expected {Kind(kind).name} from {self.peer}, got {Kind(hdr.kind).name}")
        if tag is not None and hdr.tag != tag:
            raise ProtocolError(f"expected tag {tag} from {self.peer}, got {hdr.tag} (ranks out of step)")

    def _read_header(self) -> Header:
        try:
            if self.link_hook is not NO_LINK_HOOK:  # emulated links: no spin, the hook paces the waits
                self.link_hook.on_wait(self.peer_rank, self.rank)
                recv_into(self.sock, self._wire_hdr_view, self.peer)
            else:  # the body follows the header in the same send, so only the header's wait spins
                spin = self.spin
                recv_into(self.sock, self._wire_hdr_view, self.peer,
                          spin.poll(self.sock, self._wire_hdr_view, self.peer) if spin.spin_s else 0)
            return self.header_in()
        except (PeerLost, PeerTimeout) as e:
            raise e.at(self.peer_rank)

    def _read_body(self, hdr: Header, out: np.ndarray | None = None) -> tuple[np.ndarray, Stamps]:
        out = np.empty(hdr.shape, dtype=numpy_dtype(hdr.dtype)) if out is None else out
        try:
            if self.cipher is None and not hdr.flags:  # the plain, unstamped path: straight into `out`
                if hdr.nbytes:
                    recv_into(self.sock, payload_view(out), self.peer)
                return out, NO_STAMPS
            dst = payload_view(out)
            for view in self.body_views(hdr, dst):
                recv_into(self.sock, view, self.peer)
        except (PeerLost, PeerTimeout) as e:
            raise e.at(self.peer_rank)
        return out, self.body_in(hdr, dst)

    def recv_array(self, kind: int = Kind.TENSOR, tag: int | None = None) -> np.ndarray:
        """Receive one array into new memory; its shape and dtype come from the header."""
        hdr = self._read_header()
        self.check(hdr, kind, tag)
        arr, stamps = self._read_body(hdr)
        self.delivered(hdr, stamps)
        return arr

    def recv_any(self, kinds: tuple[int, ...] = (Kind.CONTROL, Kind.TENSOR)) -> tuple[Header, np.ndarray]:
        """Next frame of any of `kinds` into new memory: (header, payload). ERROR/BYE/other kinds raise."""
        hdr = self._read_header()
        if hdr.kind not in kinds:
            self.check(hdr, kinds[0], None)
        arr, stamps = self._read_body(hdr)
        self.delivered(hdr, stamps)
        return hdr, arr

    def recv_into(self, out: np.ndarray, kind: int = Kind.TENSOR, tag: int | None = None) -> np.ndarray:
        """Receive one array into the preallocated C-contiguous `out` (same shape and dtype); returns `out`."""
        hdr = self._read_header()
        self.check(hdr, kind, tag)
        check_fits(hdr, out, self.peer)
        _, stamps = self._read_body(hdr, out)
        self.delivered(hdr, stamps)
        return out

    def recv_json(self, kind: int = Kind.CONTROL, tag: int | None = None) -> dict:
        return parse_json(self.recv_array(kind, tag), self.peer)

    def pending_error(self) -> CommError | None:
        """After a failed send: an ERROR frame the peer sent before leaving explains why (None if absent)."""
        try:
            self.sock.settimeout(0.2)
            self.spin = Spin()  # a socket with a Python timeout waits in poll() already: no spinning
            for _ in range(8):
                hdr = self._read_header()
                if hdr.kind == Kind.ERROR and hdr.nbytes <= SMALL_FRAME_NBYTES:
                    return remote_error(self._read_body(hdr)[0], self.peer)
                if hdr.nbytes > SMALL_FRAME_NBYTES:
                    return None
                self._read_body(hdr)
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
                self.sock.sendmsg(self.frame(Kind.BYE, np.empty(0, np.uint8), 0, hook=False))
            except (OSError, TpiError):
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # EOF now, even if a forked child still holds the fd
        except OSError:
            pass
        self.sock.close()
