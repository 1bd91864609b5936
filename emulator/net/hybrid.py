"""The user-space delay stage on top of kernel rate limiting: the link hook of the kernel backend.

Owns `DelayStage`: with devices in namespaces (kernel.py), the kernel's token buckets move the bytes at
the links' rates (real TCP: segments, headers, ACKs, queueing in tbf); where the kernel has no netem,
this stage adds what the links' latency, jitter and loss would: each frame is held until
    arrival of its last byte + sum over the route's hops of (latency + jitter draw) (+ one RTO per loss)
    - the host's least send-to-arrival time from that peer so far, less what idle token buckets hold
with the same draws as the user-space model (links.message_rng). The last term is the host's own cost
of moving a frame (sealing, syscalls, the network stack), learned from the cheapest frame seen: the
user-space shaper's deadlines (t_send + link time) hide it inside the latency, and so does this stage,
so both backends charge the same link time; only what the kernel adds on top (its rate limiting and
queueing, the extra host time of bigger frames) remains. Wall clock only: the kernel runs in real time.
Must not send or receive frames itself (it only peeks at its own sockets' queues).

When did the last byte arrive? If the receiver was already blocked in the receive (the transport calls
on_wait first), on_recv runs when it arrives. If the device was busy and the frame had fully arrived
before it asked, on_wait finds it queued: the kernel's receive timestamp of the last queued segment
(SO_TIMESTAMPNS, peeked without consuming) is its arrival. This stays exact as long as at most one
frame per peer is queued at once (the case in tensor-parallel steps); with more, the later frame's
arrival is taken, a delay the other way.

Latency placement: the user-space model adds each hop's latency between hops; here all latency comes
after the kernel's rate stages. With equal per-hop latencies the queues see the same arrivals shifted
by a constant, so the times are the same; with unequal ones, queueing at a shared link can differ.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
import termios
import time

from emulator.config.topology import Topology
from emulator.net.clock import WallClock
from emulator.net.links import RTO_MIN_S, Routes, message_rng, needs_draws
from tpicore.comm.frame import STAMPS_NBYTES
from tpicore.errors import TpiError

LATE_S = 0.001
PEEK_MAX_BYTES = 8 << 20
_TIMESPEC = struct.Struct("@ll")
SO_TIMESTAMPNS = 35  # Linux (asm-generic/socket.h, 64-bit time_t); the socket module does not name it


class DelayStage:
    """The link hook for device `rank` of a kernel-shaped network (see the module docstring).

    addresses: peer rank -> the IP its sockets use (KernelNetwork.address), to find this process's
    socket to each peer. seed: as for LinkShaper (the same draws).
    """

    def __init__(self, topology: Topology, rank: int, addresses: dict[int, str], clock=None, seed: int = 0,
                 rto_min_s: float = RTO_MIN_S) -> None:
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
        self._host_s: dict[int, float] = {}  # per source: the least send-to-arrival time seen (host, not link)
        self._socks: dict[int, socket.socket] = {}
        self._peek = bytearray(0)  # reused peek buffer
        self._waited: dict[int, tuple[int, float] | None] = {}  # src -> (bytes queued, last arrival) at on_wait
        # any socket asking for receive timestamps makes the kernel stamp every packet it receives (a global
        # switch), so the first frames are stamped too, before we know which socket carries them
        self._stamper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamper.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def now(self) -> float:
        return time.perf_counter()

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        self.sent += 1
        return 0.0  # nothing to stamp but t_send: the receiver measures the arrival itself

    def on_wait(self, src_rank: int, dst_rank: int) -> None:
        self._waited[src_rank] = self._queued(src_rank)

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None:
        """Hold the frame for its route's latency, counted from when it entered the wire."""
        t_done = time.perf_counter()
        self.received += 1
        queued = self._waited.pop(src_rank, None)
        arrived = t_done
        if queued is not None and queued[0] >= nbytes + STAMPS_NBYTES:  # it was all there before we asked
            arrived = min(t_done, queued[1])
        # the host's own least transit from this peer (sealing, syscalls, the stack; no shaping) is not
        # link time: the latency counts from t_send + that, as the user-space shaper's deadlines do
        host_s = self._host_s.get(src_rank, 0.0)
        if t_send > 0.0:  # stamped (always, unless the frame bypassed the hook)
            transit = max(0.0, arrived - t_send - self.idle_shaping_s(src_rank, dst_rank, nbytes))
            host_s = self._host_s[src_rank] = min(self._host_s.get(src_rank, transit), transit)
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

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
        self._stamper.close()
