"""The user-space delay stage on top of kernel rate limiting: the link hook of the kernel backend.

Owns `DelayStage` and `HostTransit`: with devices in namespaces (kernel.py), the kernel's token buckets
move the bytes at the links' rates (real TCP: segments, headers, ACKs, queueing in tbf); where the kernel
has no netem, this stage adds what the links' latency, jitter and loss would: each frame is held until
    arrival of its last byte + sum over the route's hops of (latency + jitter draw) (+ one RTO per loss)
    - the host's least send-to-arrival time so far, less what idle token buckets hold
with the same draws as the user-space model (links.message_rng). The last term is the host's own cost
of moving a frame (sealing, syscalls, the network stack), learned from the cheapest frame any device of
the network has seen (HostTransit, shared: a per-peer least would also learn queueing, e.g. the master's
third reply of a star allreduce always waits behind the first two): the user-space shaper's deadlines
(t_send + link time) hide it inside the latency, and so does this stage, so both backends charge the
same link time; only what the kernel adds on top (its rate limiting and queueing, and the host time of
bigger frames: a 1 MiB frame is sealed, ~2-3 ms here, before its first byte enters the kernel, while the
user-space shaper's link time starts at the send and overlaps that) remains. Wall clock only: the kernel
runs in real time. Must not send or receive frames itself (it only peeks at its own sockets' queues).

When did the last byte arrive? Always the kernel's receive timestamp of the last queued segment
(SO_TIMESTAMPNS, peeked without consuming), never our wake-up (on a loaded host a blocked receiver wakes
0.1-5 ms after its data; dating frames by that wake-up cost ~0.6 ms per allreduce round trip). on_wait
(the transport calls it before blocking in a receive) peeks at what is queued; if nothing is, it waits
for the first bytes itself (poll) and peeks then; if fewer bytes are queued than the last frame from that
peer had, it follows the rest (SO_RCVLOWAT = that size, poll, peek) until they are there: until the
frame would be due (its first bytes + the route's least latency - host transit), then only while bytes
keep coming, so a frame smaller than the last one costs no lateness (and not while our last send is
still stuck in a full socket: a duplex exchange calls on_wait with bytes of its own left to send). A
frame not yet whole when on_wait returns (it is bigger than the last one, or stalled) is dated when the
transport has read it. This stays exact as long as at most one frame per peer is queued at once (the case in
tensor-parallel steps); with more, the later frame's arrival is taken, a delay the other way.

Latency placement: the user-space model adds each hop's latency between hops; here all latency comes
after the kernel's rate stages. With equal per-hop latencies the queues see the same arrivals shifted
by a constant, so the times are the same; with unequal ones, queueing at a shared link can differ.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import select
import socket
import stat
import struct
import termios
import time
from collections import deque

from emulator.config.topology import Topology
from emulator.net.clock import WallClock
from emulator.net.links import RTO_MIN_S, Routes, message_rng, needs_draws
from tpicore.comm.frame import STAMPS_NBYTES
from tpicore.errors import TpiError

LATE_S = 0.001
PEEK_MAX_BYTES = 8 << 20
PEEK_WAIT_S = 1.0  # on_wait waits this long for a frame's first bytes; later ones are dated by our wake-up
FOLLOW_MARGIN_S = 0.0003  # _follow: time left to read and open a frame before it is due; its look interval after
_TIMESPEC = struct.Struct("@ll")
_DOUBLE = struct.Struct("@d")
SO_TIMESTAMPNS = 35  # Linux (asm-generic/socket.h, 64-bit time_t); the socket module does not name it


class HostTransit:
    """The host's least transit of a frame (seconds), shared by every device process of one network: an
    anonymous shared page made before the devices fork. The host's own cost of moving a frame (sealing,
    syscalls, the stack) is a property of the host, not of a peer; its least value over all frames is
    taken from some frame that queued nowhere, which a per-peer least is not (in a star allreduce the
    master's third reply always queues behind the first two)."""

    def __init__(self) -> None:
        self._cell = mmap.mmap(-1, _DOUBLE.size)
        _DOUBLE.pack_into(self._cell, 0, math.inf)

    def offer(self, transit_s: float) -> float:
        """Take `transit_s` into the least; returns the least (races between processes only lose an offer)."""
        least = _DOUBLE.unpack_from(self._cell, 0)[0]
        if transit_s < least:
            _DOUBLE.pack_into(self._cell, 0, transit_s)
            least = transit_s
        return least


class DelayStage:
    """The link hook for device `rank` of a kernel-shaped network (see the module docstring).

    addresses: peer rank -> the IP its sockets use (KernelNetwork.address), to find this process's
    socket to each peer. seed: as for LinkShaper (the same draws). host: the network's HostTransit
    (shared by its devices); None: this process learns its own.
    """

    def __init__(self, topology: Topology, rank: int, addresses: dict[int, str], clock=None, seed: int = 0,
                 rto_min_s: float = RTO_MIN_S, host: HostTransit | None = None) -> None:
        self.clock = clock if clock is not None else WallClock()
        if self.clock.virtual:
            raise TpiError("kernel backend: needs the wall clock (the kernel shapes in real time); "
                           "use clock: wall, or the user-space shaper")
        self.topology, self.rank, self.seed = topology, rank, seed
        self.routes = Routes(topology, rto_min_s=rto_min_s)
        self.addresses = addresses
        self.sent = self.received = self.late = 0
        self.max_late_s = 0.0
        self.last_delivery_s = 0.0
        self._seq: dict[int, int] = {}  # messages received per source (for the draws)
        self.host = host if host is not None else HostTransit()
        self.host_s = 0.0  # the least send-to-arrival time seen on the host, less idle shaping (host, not link)
        self.entry_s: deque[float] = deque(maxlen=256)  # t_send -> first bytes at the receiver, recent frames
        self._first: dict[int, tuple[int, float]] = {}  # src -> the first peek at its next frame
        self._socks: dict[int, socket.socket] = {}
        self._peek = bytearray(0)  # reused peek buffer
        self._waited: dict[int, tuple[int, float] | None] = {}  # src -> (bytes queued, last arrival) at on_wait
        self._frame_bytes: dict[int, int] = {}  # src -> bytes of the last frame from it (where the next may end)
        self._last_dst: int | None = None  # the peer of the last on_send
        # any socket asking for receive timestamps makes the kernel stamp every packet it receives (a global
        # switch), so the first frames are stamped too, before we know which socket carries them
        self._stamper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamper.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def now(self) -> float:
        return time.perf_counter()

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        self.sent += 1
        self._last_dst = dst_rank
        return 0.0  # nothing to stamp but t_send: the receiver measures the arrival itself

    def on_wait(self, src_rank: int, dst_rank: int) -> None:
        """Date the next frame from src_rank by the kernel's receive stamps, not by our wake-up: peek at
        what is queued; if nothing is, wait (at most PEEK_WAIT_S) for its first bytes; if fewer bytes are
        queued than the last frame from src_rank had, follow the rest as it arrives (see _follow)."""
        queued = self._queued(src_rank)
        if queued is None and self._readable(src_rank, PEEK_WAIT_S):
            queued = self._queued(src_rank)
        expect = self._frame_bytes.get(src_rank, 0)
        if queued is not None:
            self._first[src_rank] = queued
        if queued is not None and queued[0] < expect and not self._send_pending():
            queued = self._follow(src_rank, dst_rank, queued, expect)
        self._waited[src_rank] = queued

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None:
        """Hold the frame for its route's latency, counted from when it entered the wire."""
        t_done = time.perf_counter()
        self.received += 1
        queued = self._waited.pop(src_rank, None)
        self._frame_bytes[src_rank] = nbytes + STAMPS_NBYTES
        arrived = t_done
        if queued is not None and queued[0] >= nbytes + STAMPS_NBYTES:  # it was all there before we asked
            arrived = min(t_done, queued[1])
        # the host's own least transit (sealing, syscalls, the stack; no shaping) is not link time: the
        # latency counts from t_send + that, as the user-space shaper's deadlines do
        if t_send > 0.0:  # stamped (always, unless the frame bypassed the hook)
            shaping_s = self.idle_shaping_s(src_rank, dst_rank, nbytes)
            self.host_s = self.host.offer(max(0.0, arrived - t_send - shaping_s))
            first = self._first.pop(src_rank, None)
            if first is not None and first[0] < nbytes + STAMPS_NBYTES:  # we saw its first bytes arrive
                ahead_s = self.idle_shaping_s(src_rank, dst_rank, first[0])  # the bytes seen took this long
                self.entry_s.append(max(0.0, first[1] - ahead_s - t_send))
        host_s = self.host_s
        deadline = arrived + max(0.0, self.delay_s(src_rank, dst_rank, nbytes) - host_s)
        self.last_delivery_s = deadline
        late = t_done - deadline
        if late > LATE_S:
            self.late += 1
            self.max_late_s = max(self.max_late_s, late)
        self.clock.wait_until(deadline)

    def idle_shaping_s(self, src: int, dst: int, nbytes: int) -> float:
        """What the kernel's token buckets alone hold a frame of nbytes on idle links: the bytes past the
        bucket at the slowest hop (packets pipeline across hops). Not host time, so not learned as such."""
        hops = self.routes.hops(src, dst)
        if hops is None:
            return 0.0
        return max(0, nbytes - self.routes.burst_bytes) * max(h.s_per_byte for h in hops)

    def delay_s(self, src: int, dst: int, nbytes: int) -> float:
        """Latency + jitter draws (+ RTOs) of the route for the next message src -> dst."""
        hops = self.routes.hops(src, dst)
        if hops is None:
            return 0.0
        seq = self._seq.get(src, 0)
        self._seq[src] = seq + 1
        rng = message_rng(self.seed, src, dst, seq) if needs_draws(hops) else None
        packets = max(1, -(-nbytes // 1500))
        total = 0.0
        for hop in hops:
            d = hop.latency_s
            if hop.jitter_s:
                d = max(0.0, d + rng.uniform(-hop.jitter_s, hop.jitter_s))
            total += d
            if hop.loss and rng.random() < 1.0 - (1.0 - hop.loss) ** packets:
                total += self.routes.rto_s(hops)
        return total

    # -- peeking at this process's socket to a peer --------------------------------------------------------
    def _queued(self, src: int) -> tuple[int, float] | None:
        """(bytes waiting in the socket from `src`, perf_counter time the last of them arrived), or None."""
        sock = self._socket(src)
        if sock is None:
            return None
        try:
            n = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            if not n:
                return None
            n = min(n, PEEK_MAX_BYTES)
            if len(self._peek) < n:
                self._peek = bytearray(n)
            got, anc, _, _ = sock.recvmsg_into([memoryview(self._peek)[:n]], socket.CMSG_SPACE(_TIMESPEC.size),
                                               socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._socks.pop(src, None)
            return None
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack(raw[:_TIMESPEC.size])
                offset = time.time() - time.perf_counter()  # CLOCK_REALTIME stamp -> perf_counter
                return got, sec + nsec * 1e-9 - offset
        return None

    def _follow(self, src: int, dst: int, queued: tuple[int, float], expect: int) -> tuple[int, float]:
        """Wait until `expect` bytes are queued from src (SO_RCVLOWAT), peeking then. Until the frame would
        be due if it were whole (its first bytes + the route's least latency - the host's transit -
        FOLLOW_MARGIN_S) it waits; after that only while bytes keep coming (a look every FOLLOW_MARGIN_S):
        a frame smaller than `expect` then costs no lateness, one still arriving (queued behind others)
        is dated by its last byte. Returns what is queued when it stops (a bigger frame than `expect`
        is dated by on_recv's fallback: when it was read)."""
        sock = self._socket(src)
        if sock is None:
            return queued
        end = queued[1] + self.routes.lookahead_s(src, dst) - self.host_s - FOLLOW_MARGIN_S
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, expect)
            while queued[0] < expect:
                left_s = end - time.perf_counter()
                ready = self._readable(src, left_s if left_s > 0 else FOLLOW_MARGIN_S)
                more = self._queued(src)
                if more is None:
                    break
                if more[0] > queued[0]:
                    queued = more
                elif ready or left_s <= 0:  # end of stream, or past its due time with nothing new
                    break
        except OSError:
            pass
        finally:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                self._socks.pop(src, None)
        return queued

    def _send_pending(self) -> bool:
        """Whether our socket to the peer we last sent to is full (not writable): the caller may be a
        duplex exchange that still has bytes of its own to send once on_wait returns, and its peer may be
        waiting for them before it sends the rest of ours; following would stall both until its end."""
        sock = self._socket(self._last_dst) if self._last_dst is not None else None
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        return not poller.poll(0)

    def _readable(self, src: int, timeout_s: float) -> bool:
        """Wait until our socket to `src` is readable (bytes at its low-water mark, or EOF), at most
        timeout_s; whether it is."""
        sock = self._socket(src)
        if sock is None or timeout_s <= 0:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        try:
            return bool(poller.poll(timeout_s * 1e3))
        except InterruptedError:
            return False

    def _socket(self, src: int) -> socket.socket | None:
        """Our TCP socket to peer `src` (found once among this process's descriptors, by peer address)."""
        sock = self._socks.get(src)
        if sock is not None:
            return sock
        want = self.addresses.get(src)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if s.type == socket.SOCK_STREAM and s.getpeername()[0] == want:
                    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                    self._socks[src] = s
                    return s
            except OSError:
                pass
            s.close()
        return None

    def stats(self) -> dict:
        return {"sent": self.sent, "received": self.received, "late": self.late, "max_late_ms": self.max_late_s * 1e3}

    def first_byte_ms(self) -> float:
        """Median over recent frames whose first bytes it saw arrive: ms from the send to those bytes (the
        sender's host time before the wire, sealing above all), or 0.0 if none."""
        entry = sorted(self.entry_s)
        return entry[len(entry) // 2] * 1e3 if entry else 0.0

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
        self._stamper.close()
