"""Per-device resource limits without privileges: cores (CPU affinity + BLAS threads) and the memory watchdog.

- `apply_cores(n)` -- in the device process, before NumPy is imported: pin to min(n, available) cores
  and cap BLAS threads at n. On a 2-core host eight 8-core devices all share the same 2 cores; the
  virtual clock (clock.py) is what keeps their timing honest, not the affinity.
- `MemoryWatchdog(pid, cap_bytes)` -- a thread in the parent that reads the device's /proc/PID/status
  every `interval_s` (10 ms) and SIGKILLs it when either its resident set now (VmRSS) or the kernel's
  high-water mark of it (VmHWM) is above the cap, recording an `OomEvent` (by "watchdog" or
  "watchdog (peak)"). VmHWM is kept by the kernel on every page fault, so a spike that came and went
  between two samples (200 MB allocated and freed within 10 ms) is still caught at the next sample:
  sampling sets how late a device is stopped, never whether. `check()` takes one sample now (the
  supervisor calls it before it records a run as complete).

What the cap counts (the same rule for the watchdog and for the kernel, emulator/host/cgroup.py): the
device's resident set -- anonymous memory (arrays, KV cache, buffers, the interpreter) plus the file
pages it maps (VmRSS) -- which the watchdog enforces; and, under a cgroup, also the page cache of the
device's own reads, which the kernel reclaims before it OOM-kills (as a device with that much RAM
would), so it squeezes the cache and stops the device only when what it cannot give back is over the cap.

Kernel-enforced limits (cgroups under a root the user gives): emulator/host/cgroup.py.

Layer: host. Must not import emulator.results, run or figures, nor NumPy.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from threadpoolctl import threadpool_limits

from tpicore.errors import TpiError

log = logging.getLogger(__name__)

BLAS_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                 "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------------------------------------------
# Cores


def blas_env(threads: int) -> dict[str, str]:
    """Environment that caps every common BLAS/OpenMP pool at `threads`; for a child's env, or
    os.environ before NumPy is first imported (the pools size themselves at import)."""
    if threads < 1:
        raise TpiError(f"cores: must be >= 1, got {threads}")
    return {var: str(threads) for var in BLAS_ENV_VARS}


def apply_cores(n: int, first: int = 0) -> list[int]:
    """Limit this process to n cores: CPU affinity to min(n, available) of the cores it may use now,
    taken round-robin from position `first` (pass rank * n so devices spread over a big host), and
    n BLAS threads. Returns the cores it is pinned to.

    Call it first thing in the device process. If NumPy is already imported the env vars come too late
    for its BLAS pool; then threadpoolctl resizes the pool.
    """
    if n < 1:
        raise TpiError(f"cores: must be >= 1, got {n}")
    os.environ.update(blas_env(n))
    available = sorted(os.sched_getaffinity(0))
    chosen = sorted(available[(first + k) % len(available)] for k in range(min(n, len(available))))
    os.sched_setaffinity(0, chosen)
    if "numpy" in sys.modules:
        threadpool_limits(limits=n)
    return chosen


# ---------------------------------------------------------------------------------------------------
# Memory watchdog

WATCHDOG = "watchdog"  # OomEvent.by: VmRSS over the cap at a sample
WATCHDOG_PEAK = "watchdog (peak)"  # VmHWM over the cap: a spike between two samples
INTERVAL_S = 0.01  # how often the watchdog reads /proc/PID/status (VmHWM catches what falls between)


@dataclass(frozen=True)
class OomEvent:
    """The watchdog killed `device` (pid): its RSS now (by "watchdog") or its peak RSS since it started
    (VmHWM, by "watchdog (peak)") was `rss_bytes`, above the cap."""

    device: str
    pid: int
    rss_bytes: int
    cap_bytes: int
    t: float  # time.monotonic() of the kill
    by: str = WATCHDOG

    def __str__(self) -> str:
        what = "peak RSS" if self.by == WATCHDOG_PEAK else "RSS"
        return (f"{self.device} (pid {self.pid}) out of memory: {what} {self.rss_bytes / 2**20:.1f} MiB > "
                f"cap {self.cap_bytes / 2**20:.1f} MiB; killed by the {self.by}")


def read_rss(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes from /proc/PID/status; None once the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # reported in kB
    if "VmRSS" not in fields:  # zombie: no memory left to count
        return None
    return fields["VmRSS"], fields.get("VmHWM", fields["VmRSS"])


class MemoryWatchdog:
    """Reads a device process's VmRSS and VmHWM every `interval_s`; when either is above `cap_bytes` it
    SIGKILLs the process and records an OomEvent in `events`. `peak_rss_bytes` is the highest VmHWM seen.

        with MemoryWatchdog(proc.pid, 8 << 30, device="d3") as dog:
            proc.wait()
        report(dog.peak_rss_bytes, dog.events)
    """

    def __init__(self, pid: int, cap_bytes: int, interval_s: float = INTERVAL_S, device: str = "") -> None:
        if cap_bytes <= 0:
            raise TpiError(f"cap_bytes: must be > 0, got {cap_bytes}")
        if interval_s <= 0:
            raise TpiError(f"interval_s: must be > 0, got {interval_s}")
        self.pid, self.cap_bytes, self.interval_s = pid, cap_bytes, interval_s
        self.device = device or f"pid {pid}"
        self.events: list[OomEvent] = []
        self.peak_rss_bytes = 0
        self._lock = threading.Lock()  # check() runs on the thread and from the supervisor
        self._gone = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"memwatch-{self.device}", daemon=True)

    def start(self) -> "MemoryWatchdog":
        self._thread.start()
        return self

    def check(self) -> OomEvent | None:
        """One sample now: kill the process if its RSS or its peak RSS is over the cap. Returns the
        event of this kill, or None (under the cap, already stopped, or gone)."""
        with self._lock:
            if self._gone or self.events:
                return None
            sample = read_rss(self.pid)
            if sample is None:
                self._gone = True
                return None
            rss, hwm = sample
            self.peak_rss_bytes = max(self.peak_rss_bytes, hwm)
            if hwm <= self.cap_bytes:  # VmHWM >= VmRSS always
                return None
            by = WATCHDOG if rss > self.cap_bytes else WATCHDOG_PEAK
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                self._gone = True
                return None
            event = OomEvent(self.device, self.pid, rss if by == WATCHDOG else hwm, self.cap_bytes,
                             time.monotonic(), by)
            self.events.append(event)
        log.warning("%s", event)
        return event

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            if self._gone or self.events:
                return
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def oom(self) -> bool:
        return bool(self.events)

    def __enter__(self) -> "MemoryWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
