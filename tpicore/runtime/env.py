"""The world a device runs in: its clock, its disk and its links, as objects passed in once.

Layer: runtime (imports tpicore.comm.channel for the LinkHook protocol, tpicore.model.cost for `Work`, and
tpicore.errors). Owns the `Clock` protocol and the one `WallClock`, the `DiskModel` (how long reading n
bytes takes: n / rate + one access latency), and
`DeviceEnv`, which bundles the three. The defaults are the real world: wall time, the host's disk as
fast as it is, links as they are. The emulator hands in its own (a virtual clock, a modelled disk, a
link shaper) without the core's signatures knowing about emulation. Must not read files or measure.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from tpicore.comm.channel import LinkHook
from tpicore.comm.collectives import Collective, chunk_bounds, tree_children
from tpicore.errors import TpiError
from tpicore.model.cost import NO_WORK, Work, elementwise_work

# Sleeping overshoots by ~0.1 ms (p99 ~0.2 ms): sleep until this much before a deadline, then spin.
SPIN_S = 0.0002


class Clock(Protocol):
    """What "now" means for one device. Device brackets each block's compute with begin/end_compute
    (a virtual clock charges the CPU time in between, or its compute model's time for the block's `work`);
    sources charge modelled waits with advance / advance_to, which a wall clock really waits out.
    cost_s prices CPU work done outside a block (a reduction, sampling, the loader's widening): what the
    caller then advances by (0 on a wall clock, where that time has really passed)."""

    virtual: bool  # True: time is the device's own (the emulator), not the host's
    speed: float  # a virtual clock charges CPU seconds / speed; 1 on a wall clock

    def now(self) -> float: ...
    def begin_compute(self, work: Work = NO_WORK) -> None: ...
    def end_compute(self) -> None: ...
    def cost_s(self, cpu_s: float, work: Work) -> float: ...
    def advance(self, dt: float) -> None: ...
    def advance_to(self, t: float) -> None: ...


class WallClock:
    """Real time on the host's shared monotonic clock (time.perf_counter, the same in every process).

    spin_s: how long before a deadline to stop sleeping and spin (lands within ~1 us but burns a core;
    with more waiting processes than cores pass 0: plain sleep, ~0.1 ms late on average).
    """

    virtual = False
    speed = 1.0

    def __init__(self, spin_s: float = SPIN_S) -> None:
        self.spin_s = spin_s

    def now(self) -> float:
        return time.perf_counter()

    @contextmanager
    def compute(self) -> Iterator[None]:
        yield  # real time passes by itself

    def begin_compute(self, work: Work = NO_WORK) -> None:
        pass

    def end_compute(self) -> None:
        pass

    def cost_s(self, cpu_s: float, work: Work) -> float:
        return 0.0  # the work took its real time already

    def advance(self, dt: float) -> None:
        """A modelled wait (e.g. a disk load) on a wall clock really waits."""
        if dt > 0:
            self.wait_until(time.perf_counter() + dt)

    def advance_to(self, t: float) -> None:
        self.wait_until(t)

    def wait_until(self, deadline: float) -> None:
        """Return at `deadline` (perf_counter seconds): one sleep to just before it, then spin. Never a
        chain of short sleeps, whose overshoots would add up."""
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        if remaining > self.spin_s:
            time.sleep(remaining - self.spin_s)
        while time.perf_counter() < deadline:
            pass


def reduction_work(allreduce: object, size: int) -> Work:
    """The adds this rank does in one allreduce of `size` float32 elements (each reads two, writes one):
    star: the root adds N-1 vectors; ring: N-1 chunks of its own; tree: one vector per child. A plain
    function (one device, a test's stand-in) adds nothing."""
    if not isinstance(allreduce, Collective):
        return NO_WORK
    n, r = allreduce.group.world_size, allreduce.group.rank
    if allreduce.algo == "star":
        elems = (n - 1) * size if r == 0 else 0
    elif allreduce.algo == "ring":
        b = chunk_bounds(size, n)
        elems = sum(b[(r - s - 1) % n + 1] - b[(r - s - 1) % n] for s in range(n - 1))
    else:
        elems = len(tree_children(r, n)) * size
    return elementwise_work(elems, reads=2, writes=1)


@dataclass(frozen=True)
class DiskModel:
    """How long a read of n bytes takes on this device's disk. The bytes are always really read; the
    model decides the time charged for them.

    read_mbps: the disk's read rate in megabits/s (like every *_mbps in this project); None: the
    host's disk as it is (a read takes what it measured). latency_ms: the access time of each read (one
    block, one on-demand tensor set, one set of embedding rows), with a modelled rate. extra_s: seconds
    added to every block load (a test's artificially slow disk; set in the test's own process, never
    sent over the wire).
    """

    read_mbps: float | None = None
    extra_s: float = 0.0
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.read_mbps is not None and not self.read_mbps > 0:
            raise TpiError(f"disk_read_mbps: must be > 0 (or None for the host's disk), got {self.read_mbps!r}")
        if not self.extra_s >= 0:
            raise TpiError(f"disk model: extra_s must be >= 0, got {self.extra_s!r}")
        if not self.latency_ms >= 0:
            raise TpiError(f"disk_latency_ms: must be >= 0, got {self.latency_ms!r}")

    @property
    def modelled(self) -> bool:
        """Whether reads are charged something other than their measured time."""
        return self.read_mbps is not None or self.extra_s > 0

    def floor_s(self, nbytes: int) -> float:
        """The least time a read of `nbytes` takes here (a wall clock waits out the rest)."""
        if self.read_mbps is None:
            return self.extra_s
        return self.extra_s + self.latency_ms / 1e3 + nbytes / (self.read_mbps * 1e6 / 8)

    def charge_s(self, nbytes: int, measured_s: float) -> float:
        """Time charged on a virtual clock for a read that really took `measured_s`: the modelled time
        with a modelled rate, else the measured time (plus extra_s)."""
        return self.floor_s(nbytes) + (0.0 if self.read_mbps is not None else measured_s)


@dataclass(frozen=True)
class DeviceEnv:
    """A device's clock, disk and link hook, passed once to whatever builds the device. Defaults: the
    real world (wall clock, the host's disk, unshaped links)."""

    clock: Clock = field(default_factory=WallClock)
    disk: DiskModel = field(default_factory=DiskModel)
    link_hook: LinkHook | None = None
