"""The link model: routes of a topology as hops, and what one message costs crossing them.

Owns the per-hop arithmetic both shaping modes share (wall: booked when sent; virtual: booked by the
causal resolver in virtual-time order), the token-bucket constants the kernel backend must match, and
the per-message random draws (jitter, loss). Does not lock or wait (schedule.py, shaper.py) and does not
decide *when* a message is booked (causal.py).

Per hop of a route (link: latency L, bandwidth B, packet p = min(PACKET_BYTES, n), bucket b = burst):
    start   = earliest time >= head at which the link is free for the whole transmission
    finish  = max(start + n/B, tail + p/B)       the last packet cannot leave before it has arrived
    head    = max(head, start + p/B - b/B) + L   first packet at the next hop (packets pipeline)
    tail    = max(tail, finish - b/B) + L        last byte at the next hop
    deliver = tail after the last hop
The booked interval [start, finish] is the link's pure-rate schedule; a token bucket of depth b sends
every message of a busy period b/B earlier than that schedule (the (sigma, rho) shaper result: output
= pure-rate output shifted by sigma/rho, never before the input). On an idle link a message of n >= b
bytes therefore takes (n - b)/B + L. b = 0 is a plain serialising link.

Token bucket, the same in both backends: BURST_BYTES = two full-size TCP segments (2 x 1448 payload
bytes at MTU 1500 with TCP timestamps). One segment is the least a kernel tbf accepts, but with one the
kernel loses tokens to timer slack and moves only 80-90% of the rate at 100-300 Mbit/s; with two it
moves 97-100% (measured, benchmarks/bench_shaper.py). The user-space model counts frame bytes
(goodput); the kernel counts wire bytes (+ 66 header bytes per segment), so the kernel backend sets tbf
`burst 2 x WIRE_PACKET_BYTES` and `rate B * WIRE_PACKET_BYTES / MSS_BYTES`: both then move B of goodput
and let two packets through at once. On an idle link a message of n >= BURST_BYTES bytes takes
(n - BURST_BYTES)/B + L; smaller ones take L.

Jitter: each hop adds a uniform sample in [-jitter, +jitter] (netem's default), clamped so the hop's
delay stays >= 0. Loss: not a drop (TCP would retransmit anyway) but a retransmission delay: on each
hop, with probability 1 - (1 - loss)^packets, the message is late by one RTO = max(200 ms, 2 x the
route's RTT), Linux's minimum RTO. Draws come from a generator seeded by (seed, src, dst, message
number on that pair), so they do not depend on which process books the message or in which order.
"""

from __future__ import annotations

import random
import zlib
from typing import NamedTuple

from emulator.config.topology import Topology
from emulator.net.schedule import LinkSchedule
from tpicore.comm.frame import HEADER_NBYTES

PACKET_BYTES = 1500
MSS_BYTES = 1448  # TCP payload of a full-size segment: MTU 1500 - IP 20 - TCP 20 - timestamps 12
WIRE_PACKET_BYTES = MSS_BYTES + 66  # that segment on an Ethernet wire (+ 14 Ethernet + 52 IP/TCP)
BURST_BYTES = 2 * MSS_BYTES  # token bucket depth in goodput bytes; the kernel's: 2 * WIRE_PACKET_BYTES
RTO_MIN_S = 0.2
WALL_KEEP_S = 0.05  # wall mode: bookings that ended this long before a new one may be forgotten (a sender
# whose clock read is later than that behind the others is late by that much anyway)


class Hop(NamedTuple):
    index: int  # row in the LinkSchedule (link ids sorted)
    s_per_byte: float  # 0.0 for unlimited
    latency_s: float
    jitter_s: float
    loss: float


class Routes:
    """A topology's routes as hops, with what the causal resolver needs to know about contention.

    Only links with a bandwidth can make messages wait for each other: `links(src, dst)` are those of
    the route, `senders(src, dst)` every rank other than src whose messages cross one of them (the ranks
    whose progress decides when a message on this route may be booked), `lookahead_s(src, dst)` the
    least time any frame takes on the route.
    """

    def __init__(self, topology: Topology, packet_bytes: int | None = PACKET_BYTES,
                 burst_bytes: int = BURST_BYTES, rto_min_s: float = RTO_MIN_S) -> None:
        self.topology = topology
        self.packet_bytes, self.burst_bytes, self.rto_min_s = packet_bytes, burst_bytes, rto_min_s
        self.index = {lid: i for i, lid in enumerate(sorted(topology.links))}  # same order in every process
        self._hops: dict[tuple[int, int], tuple[Hop, ...] | None] = {}
        self._links: dict[tuple[int, int], frozenset[int]] = {}
        self._senders: dict[tuple[int, int], tuple[int, ...]] = {}
        self._sender_sets: dict[tuple[int, int], frozenset[int]] = {}
        self._lookahead: dict[tuple[int, int], float] = {}
        self._users: dict[int, set[int]] | None = None
        key = (sorted((lid, link.latency_ms, link.bandwidth_mbps, link.jitter_ms, link.loss)
                      for lid, link in topology.links.items()),
               sorted(topology.paths.items()), packet_bytes, burst_bytes, rto_min_s)
        self.fingerprint = float(zlib.crc32(repr(key).encode()))

    def hops(self, src: int, dst: int) -> tuple[Hop, ...] | None:
        """The hops of route src -> dst, or None when every link on it is ideal."""
        out = self._hops.get((src, dst), ())
        if out == ():
            ids = self.topology.route(src, dst)
            links = [self.topology.links[lid] for lid in ids]
            out = tuple(Hop(self.index[lid], 1.0 / link.bytes_per_s, link.latency_ms / 1e3, link.jitter_ms / 1e3,
                            link.loss) for lid, link in zip(ids, links))
            out = self._hops[src, dst] = None if all(link.is_ideal for link in links) else out
        return out

    def links(self, src: int, dst: int) -> frozenset[int]:
        """The links of route src -> dst with a bandwidth (the only ones where messages wait for each other)."""
        out = self._links.get((src, dst))
        if out is None:
            topo = self.topology
            out = self._links[src, dst] = frozenset(self.index[lid] for lid in topo.route(src, dst)
                                                    if topo.links[lid].bandwidth_mbps is not None)
        return out

    def senders(self, src: int, dst: int) -> tuple[int, ...]:
        """Every rank other than src whose messages cross one of links(src, dst)."""
        out = self._senders.get((src, dst))
        if out is None:
            if self._users is None:
                rank = {d.name: r for r, d in enumerate(self.topology.devices)}
                users: dict[int, set[int]] = {}
                for (a, _), ids in self.topology.paths.items():
                    for lid in ids:
                        if self.topology.links[lid].bandwidth_mbps is not None:
                            users.setdefault(self.index[lid], set()).add(rank[a])
                self._users = users
            out = tuple(sorted(set().union(*(self._users[i] for i in self.links(src, dst))) - {src}))
            self._senders[src, dst] = out
        return out

    def sender_set(self, src: int, dst: int) -> frozenset[int]:
        out = self._sender_sets.get((src, dst))
        if out is None:
            out = self._sender_sets[src, dst] = frozenset(self.senders(src, dst))
        return out

    def lookahead_s(self, src: int, dst: int) -> float:
        """No frame (at least a bare header) crosses the route faster: latencies at -jitter, the slowest hop."""
        out = self._lookahead.get((src, dst))
        if out is None:
            hops = self.hops(src, dst)
            out = 0.0
            if hops is not None:
                slowest = max(h.s_per_byte for h in hops)
                out = (sum(max(0.0, h.latency_s - h.jitter_s) for h in hops)
                       + max(0, HEADER_NBYTES - self.burst_bytes) * slowest)
            self._lookahead[src, dst] = out
        return out

    def rto_s(self, hops: tuple[Hop, ...]) -> float:
        return max(self.rto_min_s, 2.0 * 2.0 * sum(h.latency_s for h in hops))

    def cross(self, schedule: LinkSchedule, hops: tuple[Hop, ...], t: float, nbytes: int, rng: random.Random | None,
              virtual: bool) -> float:
        """Book every hop of a message of `nbytes` entering the route at `t` (inside schedule.locked());
        returns the time its last byte reaches the destination (see the module docstring)."""
        p = nbytes if self.packet_bytes is None else min(self.packet_bytes, nbytes)
        n_packets = 1 if self.packet_bytes is None else max(1, -(-nbytes // self.packet_bytes))
        forget = t if virtual else t - WALL_KEEP_S
        head = tail = t
        for hop in hops:
            if hop.s_per_byte:
                packet_s, burst_s = p * hop.s_per_byte, self.burst_bytes * hop.s_per_byte
                start, finish = schedule.reserve(hop.index, head, nbytes * hop.s_per_byte, tail + packet_s,
                                                 virtual, forget)
                head, tail = max(head, start + packet_s - burst_s), max(tail, finish - burst_s)
            delay = hop.latency_s
            if hop.jitter_s:
                delay = max(0.0, delay + rng.uniform(-hop.jitter_s, hop.jitter_s))
            head, tail = head + delay, tail + delay
            if hop.loss and rng.random() < 1.0 - (1.0 - hop.loss) ** n_packets:
                tail += self.rto_s(hops)
        return tail


def needs_draws(hops: tuple[Hop, ...]) -> bool:
    return any(h.jitter_s or h.loss for h in hops)


def message_rng(seed: int, src: int, dst: int, seq: int) -> random.Random:
    """The generator of one message's jitter and loss draws: a function of who sent it, to whom, and
    how many messages that pair exchanged before, so runs repeat whatever the host does."""
    return random.Random(((int(seed) * 1_000_003 + src) * 1_000_003 + dst) * 1_000_003 + seq)
