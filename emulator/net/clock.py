"""Wall and virtual clocks: what "now" means for one emulated device.

Eight emulated devices on a 2-core host cannot all compute in real time, so two clocks exist:

- `WallClock` (tpicore.runtime.env's, the one wall clock; imported here for the emulator's modules):
  now = time.perf_counter() (CLOCK_MONOTONIC, the same clock in every process on the host). Time spent
  computing is whatever the host gives; `wait_until(t)` really waits. Honest when the host has at
  least as many free cores as devices compute at once.
- `VirtualClock(speed, model=...)`: each device keeps its own virtual time, starting at 0.
    * `with clock.compute():` adds what its compute model (emulator/config/compute_model.py) charges:
      `measured` (the default) the CPU time this thread spent inside (time.thread_time()) divided by the
      device's speed -- waiting for a core on a crowded host costs nothing; `free` nothing; `roofline`
      max(bytes / memory bandwidth, flops / peak) of the Work given to begin_compute(work), charged at
      the first end_compute after it (a block's compute comes before its allreduce);
    * `cost_s(cpu_s, work)` prices work done outside a block the same way (reductions, sampling, the
      loader thread's widening); the caller advances by it (on its own timeline, for the loader);
    * `advance(dt)` adds a modelled wait the caller computed (a disk load: bytes / disk bandwidth);
    * `advance_to(t)` / `wait_until(t)` = max(own time, t): a message arriving at virtual time t.
  A run's virtual duration is then what N devices of the given speed would take, if they ran alone.

What the virtual clock loses (the approximation):
- CPU time is not wall time on the emulated device: memory-bandwidth stalls and cache misses are
  counted as the host suffered them (with other processes sharing its memory bus), and a device with
  several cores running multithreaded BLAS is counted as the sum of CPU time over the calling thread
  only -- use one BLAS thread per device in virtual mode, and `speed` to model a faster/slower device.
- Work done outside `compute()` blocks and not priced with cost_s (Python glue between blocks) is free.
- Overlap inside one device (e.g. a prefetch thread loading weights while the main thread computes)
  is not modelled by a single timeline: such threads must account their own time and join via
  advance_to().
- Page-cache and disk effects are whatever the caller models through advance().
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from emulator.config.compute_model import ComputeModel, Measured
from tpicore.errors import TpiError
from tpicore.model.cost import NO_WORK, Work
from tpicore.runtime.env import SPIN_S, WallClock  # noqa: F401  (the one wall clock; importers use this module)


class VirtualClock:
    """One device's virtual time in seconds, starting at `start`. Not shared between processes:
    messages carry it (t_send / t_deliver) and receivers catch up with advance_to()."""

    virtual = True

    def __init__(self, speed: float = 1.0, start: float = 0.0,
                 cpu_time: Callable[[], float] = time.thread_time, model: ComputeModel | None = None) -> None:
        if not speed > 0:
            raise TpiError(f"speed: must be > 0, got {speed!r}")
        self.speed = float(speed)
        self.model: ComputeModel = model if model is not None else Measured(self.speed)
        self._t = float(start)
        self._cpu_time = cpu_time  # injectable so tests can stub compute time exactly
        self.compute_s = 0.0  # virtual seconds spent in compute() blocks, for reports
        self._cpu0: float | None = None  # thread CPU time at the open compute section, if any
        self._work: Work = NO_WORK  # the open block's work, charged once (roofline)

    def now(self) -> float:
        return self._t

    @contextmanager
    def compute(self) -> Iterator[None]:
        self.begin_compute()
        try:
            yield
        finally:
            self.end_compute()

    def begin_compute(self, work: Work = NO_WORK) -> None:
        self._cpu0 = self._cpu_time()
        if work is not NO_WORK:
            self._work = work

    def end_compute(self) -> None:
        """Close the section begun by begin_compute(): virtual time += the model's price of the CPU time
        in between (and of the block's work, the first time after it was given)."""
        if self._cpu0 is None:
            return
        dt = self.model.seconds(self._cpu_time() - self._cpu0, self._work)
        self._cpu0, self._work = None, NO_WORK
        self._t += dt
        self.compute_s += dt

    def cost_s(self, cpu_s: float, work: Work) -> float:
        """Virtual seconds of work done outside a compute section (the caller advances by them)."""
        return self.model.seconds(cpu_s, work)

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise TpiError(f"advance: dt must be >= 0, got {dt!r}")
        self._t += dt

    def advance_to(self, t: float) -> None:
        if t > self._t:
            self._t = t

    wait_until = advance_to  # for the shaper: a virtual device never sleeps

    def __repr__(self) -> str:
        return f"VirtualClock(speed={self.speed}, now={self._t:.6f})"
