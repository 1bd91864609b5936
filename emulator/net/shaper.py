"""User-space link shaping (netem/tbf in user space), driven by deadlines.

The transport moves bytes over TCP loopback as fast as the host can; the shaper decides *when* each
message may be seen by the receiver, from the emulated links it crosses, and the receiver waits for that
deadline. Nothing is ever delayed by a chain of sleeps, so sleep granularity does not accumulate.

    sender process (rank s)                                         receiver process (rank d)
    -----------------------                                         -------------------------
    transport.send(frame)                                           transport.recv()
      |                                                                 ^
      |  t_send    = hook.now()                                         |  hook.on_recv(s, d, n,
      |  t_deliver = hook.on_send(s, d, n)                              |      t_send, t_deliver)
      |     for each link on route(s, d), in order:                     |    wall:    sleep to deadline
      |       reserve the link's earliest free slot  <-- shared -->     |             - 0.2 ms, then spin
      |       (serialisation n*8/bandwidth), add latency (+jitter,     |    virtual: clock.advance_to(
      |       + one RTO if a packet is lost)           LinkSchedule     |             t_deliver)
      v                                               (/dev/shm, flock) |
    [header: t_send, t_deliver][payload] ====== TCP loopback =====> recv_exact ------+

Link model, per hop of the route (link: latency L, bandwidth B, packet size p = min(1500 B, n)):
    start   = earliest time >= head at which the link is free for the whole transmission
    finish  = max(start + n/B, tail + p/B)     the last packet cannot leave before it has arrived
    head    = start + p/B + L                  first packet at the next hop (packets pipeline)
    tail    = finish + L                       last byte at the next hop
    deliver = tail after the last hop
For one hop this is the textbook start = max(t, free_at); free_at = start + n/B; t = free_at + L. With
p = n (`packet_bytes=None`) it is store-and-forward at every hop; the default pipelines 1500-byte
packets across hops, as routers do, so a message crossing 4 equal links costs ~1 serialisation, not 4.

Shared links: every link's reservations live in one LinkSchedule (a float64 array in a file on /dev/shm,
mapped by every device process, one flock around each route's reservation). A link shared by several
senders -- the master's downlink in a star -- therefore queues them, FIFO by reservation. Reservations
are intervals rather than one "free at" time so that a sender whose clock is behind (virtual mode, or a
late wall-clock call) fits into an earlier gap instead of queueing behind a reservation made for the
future; the last SLOTS reservations per link are kept.

Jitter: each hop adds a uniform sample in [-jitter, +jitter] (netem's default), clamped so the hop's
delay stays >= 0. TCP keeps order, so a message never overtakes an earlier one on the same stream.
Loss: not a drop (TCP would retransmit anyway) but a retransmission delay: on each hop, with probability
1 - (1 - loss)^packets, the message is late by one RTO = max(200 ms, 2 x the route's RTT) -- Linux's
minimum RTO. Allreduce messages are too small for fast retransmit (3 duplicate ACKs), so they do wait
the RTO; for bulk transfers this is pessimistic. The retransmission does not occupy the link again.

Bandwidth is goodput (no TCP/IP header overhead). Ideal routes (all links zero latency, unlimited, no
jitter or loss) skip the schedule entirely: on_send returns now() and on_recv returns at once.

Modes: the shaper's `clock` decides. WallClock: times are perf_counter seconds, shared by all processes
on the host, and on_recv really waits. VirtualClock: times are the device's virtual seconds, the
schedule holds virtual times, and on_recv only advances the receiver's clock (see clock.py).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from emulator.net.clock import WallClock
from emulator.config.topology import Topology
from tpicore.errors import TpiError

SLOTS = 16  # reservations remembered per link; more than the messages one link has in flight at once
PACKET_BYTES = 1500
RTO_MIN_S = 0.2
LATE_S = 0.001  # a wall-mode message seen this long after its deadline counts as late (host too slow)


class LinkSchedule:
    """Busy intervals of every link, shared by all device processes: row i holds link i's last SLOTS
    reservations as (start, end) pairs, the index of the next slot to overwrite, and the latest end
    (so an idle link is recognised without reading its row).

    Create it in the parent before starting devices; children get it by fork, or by pickling (it
    pickles as its file path and re-attaches), or by `LinkSchedule.attach(path, n_links)` from a
    process started any other way. The creator removes the file on close().
    """

    def __init__(self, path: str, n_links: int, slots: int = SLOTS, owner: bool = False) -> None:
        self.path, self.n_links, self.slots, self.owner = path, n_links, slots, owner
        self._row = 2 * slots + 2
        size = max(8, 8 * n_links * self._row)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < size:
                raise TpiError(f"link schedule {path}: file too small for {n_links} links")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._view = memoryview(self._mm).cast("d")
        self._open_lock()
        # the creator removes the file on close(), or at the latest when it exits or drops the object
        self._unlink = weakref.finalize(self, _unlink_in, path, os.getpid()) if owner else None

    def _open_lock(self) -> None:
        # flock belongs to an open file description: after fork the child must open its own, or parent
        # and child would both "hold" it. The thread lock covers threads of one process (same fd).
        self._pid = os.getpid()
        self._lock_fd = os.open(self.path, os.O_RDWR)
        self._tlock = threading.Lock()

    @classmethod
    def create(cls, n_links: int, slots: int = SLOTS) -> "LinkSchedule":
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="tpi-links-", dir=shm)
        try:
            os.ftruncate(fd, max(8, 8 * n_links * (2 * slots + 2)))  # zero-filled: no reservations
        finally:
            os.close(fd)
        return cls(path, n_links, slots, owner=True)

    @classmethod
    def attach(cls, path: str, n_links: int, slots: int = SLOTS) -> "LinkSchedule":
        return cls(path, n_links, slots, owner=False)

    def __getstate__(self) -> dict:
        return {"path": self.path, "n_links": self.n_links, "slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["n_links"], state["slots"], owner=False)

    @contextmanager
    def locked(self) -> Iterator[memoryview]:
        """Exclusive access to the float64 array across processes and threads."""
        if os.getpid() != self._pid:
            os.close(self._lock_fd)
            self._open_lock()
        with self._tlock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield self._view
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def reset(self) -> None:
        """Forget all reservations (between runs that reuse the schedule)."""
        with self.locked() as v:
            for i in range(len(v)):
                v[i] = 0.0

    def reserve(self, view: memoryview, link: int, earliest: float, size_s: float,
                min_finish: float) -> tuple[float, float]:
        """Book `link` for a transmission of `size_s` seconds that cannot end before `min_finish`:
        the earliest start >= `earliest` whose interval [start, max(start + size_s, min_finish)]
        overlaps no reservation. Records it; returns (start, finish). Call inside locked()."""
        base = link * self._row
        n2 = 2 * self.slots
        start = earliest
        if view[base + n2 + 1] > earliest:  # some reservation still runs at `earliest` (else: link idle)
            row = view[base:base + n2].tolist()
            busy = sorted((row[k], row[k + 1]) for k in range(0, n2, 2)
                          if row[k + 1] > earliest and row[k + 1] > row[k])
            for a, b in busy:
                if b <= start:
                    continue
                if max(start + size_s, min_finish) <= a:
                    break
                start = max(start, b)
        finish = max(start + size_s, min_finish)
        nxt = int(view[base + n2])
        view[base + 2 * nxt] = start
        view[base + 2 * nxt + 1] = finish
        view[base + n2] = (nxt + 1) % self.slots
        if finish > view[base + n2 + 1]:
            view[base + n2 + 1] = finish
        return start, finish

    def close(self) -> None:
        if getattr(self, "_view", None) is None:
            return
        self._view.release()
        self._view = None
        self._mm.close()
        if self._pid == os.getpid():
            os.close(self._lock_fd)
        if self._unlink is not None:
            self._unlink()

    def __enter__(self) -> "LinkSchedule":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unlink_in(path: str, creator_pid: int) -> None:
    """Remove the schedule's file, but only from the process that created it (not forked children)."""
    if os.getpid() == creator_pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _Hop(NamedTuple):
    index: int  # row in the LinkSchedule
    s_per_byte: float  # 0.0 for unlimited
    latency_s: float
    jitter_s: float
    loss: float


class LinkShaper:
    """The transport's link hook for one device process (see the module docstring for the model).

    topology: the emulated network; rank r is topology.devices[r].
    schedule: the LinkSchedule shared by all devices, with len(topology.links) links.
    clock:    WallClock() (default) or the device's VirtualClock.
    seed:     jitter/loss samples come from random.Random(seed, rank): repeatable runs.
    """

    def __init__(self, topology: Topology, schedule: LinkSchedule, rank: int, clock=None, seed: int = 0,
                 packet_bytes: int | None = PACKET_BYTES, rto_min_s: float = RTO_MIN_S) -> None:
        if schedule.n_links != len(topology.links):
            raise TpiError(f"link schedule has {schedule.n_links} links, topology {topology.name!r} "
                           f"has {len(topology.links)}")
        if not 0 <= rank < len(topology):
            raise TpiError(f"rank: must be in [0, {len(topology)}), got {rank}")
        self.topology, self.schedule, self.rank = topology, schedule, rank
        self.clock = clock if clock is not None else WallClock()
        self.packet_bytes = packet_bytes
        self.rto_min_s = rto_min_s
        self._rng = random.Random(f"{seed}:{rank}")
        # Same order in every process: link ids sorted.
        self._index = {lid: i for i, lid in enumerate(sorted(topology.links))}
        self._routes: dict[tuple[int, int], tuple[_Hop, ...] | None] = {}
        self.sent = self.received = self.late = 0
        self.max_late_s = 0.0

    def _route(self, src: int, dst: int) -> tuple[_Hop, ...] | None:
        """The hops of route src -> dst, or None when every link on it is ideal."""
        key = (src, dst)
        if key not in self._routes:
            ids = self.topology.route(src, dst)
            links = [self.topology.links[lid] for lid in ids]
            hops = tuple(_Hop(self._index[lid], 1.0 / link.bytes_per_s, link.latency_ms / 1e3,
                              link.jitter_ms / 1e3, link.loss) for lid, link in zip(ids, links))
            self._routes[key] = None if all(link.is_ideal for link in links) else hops
        return self._routes[key]

    def now(self) -> float:
        return self.clock.now()

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        """Reserve the route for a message of nbytes sent now; return its delivery deadline."""
        self.sent += 1
        t = self.clock.now()
        hops = self._route(src_rank, dst_rank)
        if hops is None:
            return t
        p = nbytes if self.packet_bytes is None else min(self.packet_bytes, nbytes)
        n_packets = 1 if self.packet_bytes is None else max(1, -(-nbytes // self.packet_bytes))
        head = tail = t
        reserve = self.schedule.reserve
        with self.schedule.locked() as view:
            for hop in hops:
                if hop.s_per_byte:
                    packet_s = p * hop.s_per_byte
                    # the last packet leaves no earlier than it arrived from the previous hop
                    start, tail = reserve(view, hop.index, head, nbytes * hop.s_per_byte, tail + packet_s)
                    head = start + packet_s
                delay = hop.latency_s
                if hop.jitter_s:
                    delay = max(0.0, delay + self._rng.uniform(-hop.jitter_s, hop.jitter_s))
                head, tail = head + delay, tail + delay
                if hop.loss and self._rng.random() < 1.0 - (1.0 - hop.loss) ** n_packets:
                    tail += self._rto_s(hops)
        return tail

    def _rto_s(self, hops: tuple[_Hop, ...]) -> float:
        rtt = 2.0 * sum(h.latency_s for h in hops)
        return max(self.rto_min_s, 2.0 * rtt)

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None:
        """Hold the received message until its deadline (wall) or move the clock to it (virtual)."""
        self.received += 1
        if not self.clock.virtual and t_deliver > t_send:
            late = time.perf_counter() - t_deliver
            if late > LATE_S:
                self.late += 1
                self.max_late_s = max(self.max_late_s, late)
        self.clock.wait_until(t_deliver)

    def stats(self) -> dict:
        return {"sent": self.sent, "received": self.received, "late": self.late,
                "max_late_ms": self.max_late_s * 1e3}
