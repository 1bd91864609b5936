"""One emulated network for one run, whichever backend shapes it: what the launcher wires.

Owns `make_network(kind, topology, clock)` and the two `Network`s it returns:

    kind     where bytes travel                     who decides when a frame is seen
    "user"   TCP loopback, host namespace           LinkShaper: the link model on a shared LinkSchedule
    "kernel" TCP between network namespaces, tbf    the kernel (rate, queues); DelayStage adds latency,
             on every directed link (kernel.py)     jitter, loss (netem instead where the kernel has it)

The launcher's side, in order: `net = make_network(...)` in the supervisor; `lst, addr =
net.master_listener()` before forking (the master's socket, in the master's namespace); in each forked
device, `net.enter(rank)` before it opens any socket, then `net.hook(rank, clock, seed)` as the group's
link hook; `net.close()` in the supervisor's cleanup, whatever happened. Must not import the launcher.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Protocol

from emulator.config.topology import Topology
from emulator.net.hybrid import DelayStage
from emulator.net.kernel import KernelNetwork
from emulator.net.schedule import LinkSchedule
from emulator.net.shaper import LinkShaper
from tpicore.comm.endpoint import open_listener
from tpicore.errors import TpiError

KINDS = ("user", "kernel")


class Network(Protocol):
    kind: str

    def master_listener(self) -> tuple[socket.socket, str]: ...
    def enter(self, rank: int) -> None: ...
    def hook(self, rank: int, clock, seed: int = 0): ...
    def close(self) -> None: ...


class UserNetwork:
    """Loopback TCP, shaped in user space by LinkShapers on one shared LinkSchedule."""

    kind = "user"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.schedule = LinkSchedule.create(len(topology.links))

    def master_listener(self) -> tuple[socket.socket, str]:
        lst = open_listener("127.0.0.1", 0)
        return lst, "127.0.0.1:%d" % lst.getsockname()[1]

    def enter(self, rank: int) -> None:
        pass

    def hook(self, rank: int, clock, seed: int = 0) -> LinkShaper:
        return LinkShaper(self.topology, self.schedule, rank, clock, seed=seed)

    def close(self) -> None:
        self.schedule.close()


class KernelBackedNetwork:
    """Namespaces and tbf (kernel.py); the DelayStage adds latency unless netem does."""

    kind = "kernel"

    def __init__(self, topology: Topology, netem: bool | None = None) -> None:
        self.topology = topology
        self.net = KernelNetwork(topology, netem=netem).open()

    def master_listener(self) -> tuple[socket.socket, str]:
        lst = self.net.call_in(0, lambda: open_listener(self.net.address(0), 0))
        return lst, "%s:%d" % (self.net.address(0), lst.getsockname()[1])

    def enter(self, rank: int) -> None:
        self.net.enter(rank)

    def hook(self, rank: int, clock, seed: int = 0) -> DelayStage:
        addresses = {r: self.net.address(r) for r in range(len(self.topology))}
        topo = self.topology
        if self.net.netem:  # the kernel delays too: the stage must add nothing more
            topo = _rate_only(topo)
        return DelayStage(topo, rank, addresses, clock=clock, seed=seed, host=self.net.host_transit)

    def close(self) -> None:
        self.net.close()


def make_network(kind: str, topology: Topology, clock: str = "wall", netem: bool | None = None) -> Network:
    """The network of one run: kind "user" (any clock) or "kernel" (clock "wall" only; needs root)."""
    if kind == "user":
        return UserNetwork(topology)
    if kind == "kernel":
        if clock != "wall":
            raise TpiError(f"options.shaper: kernel needs options.clock: wall (the kernel shapes in real "
                           f"time), got clock: {clock}")
        return KernelBackedNetwork(topology, netem=netem)
    raise TpiError(f"options.shaper: expected one of {', '.join(KINDS)}, got {kind!r}")


def _rate_only(topology: Topology) -> Topology:
    """The topology with no latency, jitter or loss (netem applies them in the kernel)."""
    links = {lid: replace(link, latency_ms=0.0, jitter_ms=0.0, loss=0.0) for lid, link in topology.links.items()}
    return replace(topology, links=links)
