"""Scripted devices: N emulated devices as threads of one process, talking through the link hook with
no sockets -- how tests and benchmarks check the link model and the causal order exactly.

Owns `run_script` and its step types. A FIFO queue per ordered pair stands for the TCP stream, so each
shaper sees exactly the calls the transport makes (sender: now, on_send; receiver: on_wait, then
on_recv once the frame is in). Must not open sockets or processes; the shaping itself is shaper.py's.

    scripts = {1: [Advance(0.010), Send(0, 4096)], 2: [Send(0, 4096)], 0: [Recv(1), Recv(2)]}
    trace = run_script(topology, scripts)      # trace.deliveries[0] == [t of 1's frame, t of 2's frame]

`Pause(host_s)` sleeps in real time: it changes the order in which threads reach the shaper (host
order) and nothing else, which is how the causality tests shuffle the host.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from emulator.config.topology import Topology
from emulator.net.clock import VirtualClock
from emulator.net.schedule import LinkSchedule
from emulator.net.shaper import LinkShaper
from tpicore.errors import TpiError


@dataclass(frozen=True)
class Send:
    dst: int
    nbytes: int


@dataclass(frozen=True)
class Recv:
    src: int


@dataclass(frozen=True)
class Advance:
    dt_s: float  # virtual seconds of compute


@dataclass(frozen=True)
class AdvanceTo:
    t_s: float


@dataclass(frozen=True)
class Pause:
    host_s: float  # real seconds; virtual time does not move


Step = Send | Recv | Advance | AdvanceTo | Pause


@dataclass
class Trace:
    """Per rank: the delivery time of each frame received (in order), the clock right after each
    receive, and the clock at the end of the script; the schedule's counters at the end."""

    deliveries: dict[int, list[float]] = field(default_factory=dict)
    clocks: dict[int, list[float]] = field(default_factory=dict)
    ends: dict[int, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


def run_script(topology: Topology, scripts: dict[int, list[Step]], *, speeds: dict[int, float] | None = None,
               timeout_s: float = 60.0, others_idle: bool = True, **shaper_kw) -> Trace:
    """Run every rank's script in its own thread on virtual clocks; raises the first failure. Ranks
    without a script send nothing (others_idle), or never attach to the schedule (others_idle=False)."""
    if others_idle:
        scripts = {r: scripts.get(r, []) for r in range(len(topology))}
    schedule = LinkSchedule.create(len(topology.links))
    streams = {(s, d): queue.Queue() for s in range(len(topology)) for d in range(len(topology)) if s != d}
    trace = Trace()
    errors: list[BaseException] = []
    shapers = {r: LinkShaper(topology, schedule, r, VirtualClock(speed=(speeds or {}).get(r, 1.0)),
                             timeout_s=timeout_s, **shaper_kw) for r in scripts}

    def device(rank: int) -> None:
        shaper, clock = shapers[rank], shapers[rank].clock
        deliveries, clocks = trace.deliveries.setdefault(rank, []), trace.clocks.setdefault(rank, [])
        try:
            for step in scripts[rank]:
                if isinstance(step, Send):
                    t_send = shaper.now()
                    stamp = shaper.on_send(rank, step.dst, step.nbytes)
                    streams[rank, step.dst].put((step.nbytes, t_send, stamp))
                elif isinstance(step, Recv):
                    shaper.on_wait(step.src, rank)
                    try:
                        nbytes, t_send, stamp = streams[step.src, rank].get(timeout=timeout_s)
                    except queue.Empty:
                        raise TpiError(f"scripted rank {rank}: nothing from rank {step.src} in {timeout_s} s") from None
                    shaper.on_recv(step.src, rank, nbytes, t_send, stamp)
                    deliveries.append(shaper.last_delivery_s)
                    clocks.append(clock.now())
                elif isinstance(step, Advance):
                    clock.advance(step.dt_s)
                elif isinstance(step, AdvanceTo):
                    clock.advance_to(step.t_s)
                else:
                    time.sleep(step.host_s)
            trace.ends[rank] = clock.now()
        except BaseException as e:  # noqa: BLE001 - reported from the calling thread
            errors.append(e)
        finally:
            shaper.close()

    threads = [threading.Thread(target=device, args=(r,), name=f"scripted-{r}") for r in scripts]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        trace.counters = schedule.counters()
    finally:
        schedule.close()
    if errors:
        raise errors[0]
    return trace
