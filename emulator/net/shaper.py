"""User-space link shaping (netem/tbf in user space), driven by deadlines: the transport's link hook.

Owns `LinkShaper`, the hook one device process plugs into its group (tpicore.comm.channel.LinkHook):
when a frame may be seen by its receiver, from the emulated links it crosses. Must not touch sockets;
the link arithmetic is links.py's, the shared state schedule.py's, the virtual-time ordering causal.py's.

The transport moves bytes over TCP loopback as fast as the host can; the shaper decides *when* each
message may be seen by the receiver, and the receiver waits for that deadline. Nothing is ever delayed by
a chain of sleeps, so sleep granularity does not accumulate.

    sender process (rank s)                                     receiver process (rank d)
    -----------------------                                     -------------------------
    channel.send_array(frame)                                   channel.recv_into(out)
      | t_send = hook.now()                                       | hook.on_wait(s, d)   (about to block)
      | hook.on_send(s, d, n)                                     | ... frame arrives over TCP ...
      |   wall:    book every hop now --> t_deliver (stamped)     | hook.on_recv(s, d, n, t_send, t_deliver)
      |   virtual: register the message, unbooked                 |   wall:    sleep to the stamped deadline
      v               \\                                          |   virtual: wait until the resolver has
    [stamps][payload]  \\--> LinkSchedule (/dev/shm, flock) <-----|            booked it (causal.py), then
        ===== TCP loopback =====>                                 |            clock.advance_to(t_deliver)

Wall clock: times are perf_counter seconds, shared by all processes on the host; a message is booked
when it is sent (real time is causal by itself) and on_recv really waits. Virtual clock: times are the
device's virtual seconds; messages are booked by the causal resolver in virtual-time order (so identical
runs give identical times, and a message is never queued behind one sent later in virtual time), and
on_recv only advances the receiver's clock. Virtual mode needs the transport's on_wait call (a device
blocked in a receive sends nothing until it returns) and one communicating thread per device.

Bandwidth is goodput (no TCP/IP header overhead); the token bucket holds BURST_BYTES (links.py). Ideal
routes (all links zero latency, unlimited, no jitter or loss) cost nothing in wall mode (no lock).
"""

from __future__ import annotations

import os
import threading
import time
import weakref

from emulator.config.topology import Topology
from emulator.net.causal import Resolver
from emulator.net.clock import WallClock
from emulator.net.links import (
    BURST_BYTES,
    PACKET_BYTES,
    RTO_MIN_S,
    Routes,
    message_rng,
    needs_draws,
)
from emulator.net.schedule import RUNNING, WAITING, WAKE_POLL_S, LinkSchedule
from tpicore.errors import TpiError

LATE_S = 0.001  # a wall-mode message seen this long after its deadline counts as late (host too slow)
RESOLVE_TIMEOUT_S = 300.0  # virtual mode: the longest a received frame may wait for its booking


class LinkShaper:
    """The transport's link hook for one device process (see the module docstring).

    topology:    the emulated network; rank r is topology.devices[r].
    schedule:    the LinkSchedule shared by all devices, with len(topology.links) links.
    clock:       WallClock() (default) or the device's VirtualClock.
    seed:        jitter/loss draws depend on (seed, src, dst, message number): repeatable runs.
    burst_bytes: token bucket depth (links.py); 0 charges every byte at the link rate.
    timeout_s:   virtual mode: give up (TpiError naming who holds it back) if a received frame is not
                 booked within this many seconds of host time.
    """

    def __init__(self, topology: Topology, schedule: LinkSchedule, rank: int, clock=None, seed: int = 0,
                 packet_bytes: int | None = PACKET_BYTES, rto_min_s: float = RTO_MIN_S,
                 burst_bytes: int = BURST_BYTES, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
        if schedule.n_links != len(topology.links):
            raise TpiError(f"link schedule has {schedule.n_links} links, topology {topology.name!r} "
                           f"has {len(topology.links)}")
        if not 0 <= rank < len(topology):
            raise TpiError(f"rank: must be in [0, {len(topology)}), got {rank}")
        self.topology, self.schedule, self.rank = topology, schedule, rank
        self.clock = clock if clock is not None else WallClock()
        self.virtual = bool(self.clock.virtual)
        self.seed, self.timeout_s = seed, timeout_s
        self.routes = Routes(topology, packet_bytes, burst_bytes, rto_min_s)
        self.sent = self.received = self.late = 0
        self.max_late_s = 0.0
        self.last_delivery_s = 0.0  # the delivery time of the last frame received (for reports and tests)
        self._seq: dict[tuple[int, int], int] = {}  # wall mode: messages sent per pair (for the draws)
        self._user: int | None = None  # virtual mode: the thread inside the hook
        self._waiting: tuple[int, float] | None = None  # virtual mode: what on_wait last published (src, now)
        self._wake_fd: int | None = None
        self._resolver = Resolver(schedule, self.routes) if self.virtual else None
        self._closer = None
        if self._resolver is not None:
            with schedule.locked():
                self._resolver.attach(rank, self.clock.now())
            self._closer = weakref.finalize(self, _detach, self._resolver, rank, os.getpid(), [None])

    def now(self) -> float:
        return self.clock.now()

    # -- the hook ------------------------------------------------------------------------------------------
    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        """Wall: book the route for a message of nbytes sent now; return its delivery deadline.
        Virtual: register it for the resolver; return the send time (the stamp is not used)."""
        self.sent += 1
        t = self.clock.now()
        if self.virtual:
            with self._one_thread():
                with self.schedule.locked():
                    self._resolver.publish(src_rank, RUNNING, t)
                    self._resolver.register(src_rank, dst_rank, nbytes, t, self.seed)
                    woken = self._resolver.run()
                self._wake(woken)
            return t
        hops = self.routes.hops(src_rank, dst_rank)
        if hops is None:
            return t
        seq = self._seq.get((src_rank, dst_rank), 0)
        self._seq[src_rank, dst_rank] = seq + 1
        rng = message_rng(self.seed, src_rank, dst_rank, seq) if needs_draws(hops) else None
        with self.schedule.locked():
            return self.routes.cross(self.schedule, hops, t, nbytes, rng, virtual=False)

    def on_wait(self, src_rank: int, dst_rank: int) -> None:
        """The transport is about to block for a frame from src_rank: until it arrives this device sends
        nothing, which lets the resolver book other devices' messages (virtual mode; wall: nothing)."""
        if not self.virtual:
            return
        with self._one_thread():
            now = self.clock.now()
            with self.schedule.locked():
                self._resolver.publish(dst_rank, WAITING, now, src_rank)
                woken = self._resolver.run()
            self._waiting = (src_rank, now)
            self._wake(woken)

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None:
        """Hold the received message until its deadline (wall) or move the clock to it (virtual)."""
        self.received += 1
        if self.virtual:
            with self._one_thread():
                self._await_booking(src_rank, dst_rank)
            return
        self.last_delivery_s = t_deliver
        if t_deliver > t_send:
            late = time.perf_counter() - t_deliver
            if late > LATE_S:
                self.late += 1
                self.max_late_s = max(self.max_late_s, late)
        self.clock.wait_until(t_deliver)

    def _await_booking(self, src: int, dst: int) -> None:
        res, sch = self._resolver, self.schedule
        if self._wake_fd is None:
            self._wake_fd = sch.doorbells.reader(dst)
            self._closer.detach()
            self._closer = weakref.finalize(self, _detach, res, dst, os.getpid(), [self._wake_fd])
        deadline = time.monotonic() + self.timeout_s
        polled = False
        rerun = self._waiting != (src, self.clock.now())  # on_wait already published this and booked what it could
        while True:
            with sch.locked():
                if not res.registered(src, dst):
                    raise TpiError(f"virtual clock: a frame from rank {src} to rank {dst} was not registered with "
                                   f"the link schedule (the sender's link hook is not a virtual-clock LinkShaper "
                                   f"on the same schedule)")
                woken: set[int] = set()
                if rerun or polled:  # a poll that timed out: maybe a device process died and woke nobody
                    res.publish(dst, WAITING, self.clock.now(), src)
                    woken = res.run(check_liveness=polled)
                t = res.take(src, dst)
                if t is not None:
                    self.last_delivery_s = t
                    self.clock.advance_to(t)
                    res.publish(dst, RUNNING, self.clock.now())
                    woken |= res.run()
                elif time.monotonic() > deadline:
                    held = res.describe(sorted(set(self.routes.senders(src, dst)) | {src}))
                    raise TpiError(f"virtual clock: the frame from rank {src} to rank {dst} was not booked within "
                                   f"{self.timeout_s:.0f} s; the ranks that could still send before it: {held}")
            self._wake(woken)
            if t is not None:
                self._waiting = None
                return
            polled = not sch.doorbells.wait(self._wake_fd, WAKE_POLL_S)

    def _wake(self, ranks: set[int]) -> None:
        if ranks:
            self.schedule.doorbells.ring(ranks)

    def _one_thread(self):
        return _OneThread(self)

    # -- reports and shutdown ------------------------------------------------------------------------------
    def stats(self) -> dict:
        out = {"sent": self.sent, "received": self.received, "late": self.late, "max_late_ms": self.max_late_s * 1e3}
        if self.virtual:
            c = self.schedule.counters()
            out.update(forced=c["forced"], violations=c["violations"])
        return out

    def close(self) -> None:
        """This device sends nothing more through this shaper (virtual mode: others stop waiting for it)."""
        if self._closer is not None:
            self._closer()


class _OneThread:
    """Virtual mode: the hook's bookkeeping assumes one communicating thread per device."""

    def __init__(self, shaper: LinkShaper) -> None:
        self.shaper = shaper

    def __enter__(self) -> None:
        me = threading.get_ident()
        if self.shaper._user not in (None, me):
            raise TpiError("virtual clock: two threads of one device use the link hook at once (one "
                           "communicating thread per device)")
        self.shaper._user = me

    def __exit__(self, *exc) -> None:
        self.shaper._user = None


def _detach(resolver: Resolver, rank: int, pid: int, fds: list[int | None]) -> None:
    """The shaper is gone (closed or collected): one fewer live shaper for its rank."""
    if os.getpid() != pid or resolver.schedule.closed:
        return
    with resolver.schedule.locked():
        resolver.detach(rank)
        woken = resolver.run()
    resolver.schedule.doorbells.ring(woken)
    for fd in fds:
        if fd is not None:
            os.close(fd)
