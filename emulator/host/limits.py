"""Per-device resource limits: cores (CPU affinity + BLAS threads), memory (a watchdog, or a cgroup).

Three tools, weakest assumptions first:

- `apply_cores(n)` -- in the device process, before NumPy is imported: pin to min(n, available) cores
  and cap BLAS threads at n. On a 2-core host eight 8-core devices all share the same 2 cores; the
  virtual clock (clock.py) is what keeps their timing honest, not the affinity.
- `MemoryWatchdog(pid, cap_bytes)` -- a thread in the parent that samples the device's RSS from
  /proc/PID/status and SIGKILLs it above the cap, recording an `OomEvent` for the report. Needs no
  privileges. Sampling means a fast allocation can overshoot the cap by what it allocates in one
  interval before it is caught.
- `DeviceCgroup(root, name, ...)` -- a kernel-enforced limit (memory.max / memory.limit_in_bytes and
  cpu.max / cpu.cfs_quota_us), only under a cgroup directory the caller owns and passes in
  (`--cgroup-root DIR`). We create one child group per device, move the pid in, and always remove the
  child group on exit. Nothing is ever created anywhere else.

Layer: host. Must not import emulator.results, run or figures.
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


@dataclass(frozen=True)
class OomEvent:
    """The watchdog killed `device` (pid) because its RSS exceeded the cap."""

    device: str
    pid: int
    rss_bytes: int
    cap_bytes: int
    t: float  # time.monotonic() of the kill

    def __str__(self) -> str:
        return (f"{self.device} (pid {self.pid}) out of memory: RSS {self.rss_bytes / 2**20:.1f} MiB > "
                f"cap {self.cap_bytes / 2**20:.1f} MiB; killed")


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
    """Samples a device process's RSS every `interval_s`; above `cap_bytes` it SIGKILLs the process
    and records an OomEvent in `events`. `peak_rss_bytes` is the highest VmHWM seen (the kernel's own
    peak, so spikes between samples count too).

        with MemoryWatchdog(proc.pid, 8 << 30, device="d3") as dog:
            proc.wait()
        report(dog.peak_rss_bytes, dog.events)
    """

    def __init__(self, pid: int, cap_bytes: int, interval_s: float = 0.05, device: str = "") -> None:
        if cap_bytes <= 0:
            raise TpiError(f"cap_bytes: must be > 0, got {cap_bytes}")
        if interval_s <= 0:
            raise TpiError(f"interval_s: must be > 0, got {interval_s}")
        self.pid, self.cap_bytes, self.interval_s = pid, cap_bytes, interval_s
        self.device = device or f"pid {pid}"
        self.events: list[OomEvent] = []
        self.peak_rss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"memwatch-{self.device}", daemon=True)

    def start(self) -> "MemoryWatchdog":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = read_rss(self.pid)
            if sample is None:
                return
            rss, hwm = sample
            self.peak_rss_bytes = max(self.peak_rss_bytes, hwm)
            if rss > self.cap_bytes:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                event = OomEvent(self.device, self.pid, rss, self.cap_bytes, time.monotonic())
                self.events.append(event)
                log.warning("%s", event)
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


# ---------------------------------------------------------------------------------------------------
# cgroups (only under a root the caller owns)


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` ('cgroup2', 'cgroup', 'tmpfs', ...)."""
    path = path.resolve()
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, fstype = mnt, parts[2]
    return fstype


class DeviceCgroup:
    """A child cgroup `root/name` limiting one device's memory and CPU, removed on exit.

    root:      a cgroup directory the caller owns. cgroup v2 if it has `cgroup.controllers`; else v1,
               where `root` is in the memory hierarchy (has memory.limit_in_bytes) and `cpu_root`
               (optional) is the caller's directory in the cpu hierarchy (has cpu.cfs_quota_us).
    mem_bytes: memory.max (v2) / memory.limit_in_bytes (v1); None leaves memory unlimited.
    cpus:      CPU bandwidth in cores, cpu.max "cpus*period period" (v2) / cfs_quota_us (v1).

        with DeviceCgroup(args.cgroup_root, "d3", mem_bytes=8 << 30, cpus=8) as cg:
            cg.add(proc.pid)
            proc.wait()
            killed = cg.oom_kills()

    On exit, processes still in the group are moved back to the parent group before it is removed (on
    a real cgroup fs the kernel refuses to remove a group that holds processes). Outside a cgroup fs
    (tests with a fake root) the interface files are plain files we create and delete.
    """

    PERIOD_US = 100_000

    def __init__(self, root: str | os.PathLike, name: str, mem_bytes: int | None = None, cpus: float | None = None,
                 cpu_root: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.name = name
        self.mem_bytes, self.cpus = mem_bytes, cpus
        self.cpu_root = Path(cpu_root) if cpu_root is not None else None
        if not self.root.is_dir():
            raise TpiError(f"--cgroup-root: {self.root} is not a directory")
        if not name or "/" in name or name in (".", ".."):
            raise TpiError(f"cgroup name: expected a plain name, got {name!r}")
        if mem_bytes is not None and mem_bytes <= 0:
            raise TpiError(f"mem_bytes: must be > 0, got {mem_bytes}")
        if cpus is not None and cpus <= 0:
            raise TpiError(f"cpus: must be > 0, got {cpus}")
        self.v2 = (self.root / "cgroup.controllers").exists()
        if not self.v2 and not (self.root / "memory.limit_in_bytes").exists():
            raise TpiError(f"--cgroup-root: {self.root} is neither a cgroup v2 directory (no cgroup.controllers) "
                           f"nor a cgroup v1 memory directory (no memory.limit_in_bytes)")
        self.real = _fs_type(self.root) in ("cgroup2", "cgroup")
        self.created: list[Path] = []  # groups we made, removed in close()
        self._written: dict[Path, list[Path]] = {}  # fake root only: files we created per group

    # -- helpers -------------------------------------------------------------------------------------
    def _write(self, group: Path, filename: str, value: str) -> None:
        path = group / filename
        if self.real and not path.exists():
            raise TpiError(f"cgroup {group}: no {filename} (is the controller enabled for this subtree?)")
        if not self.real and not path.exists():
            self._written.setdefault(group, []).append(path)
        try:
            path.write_text(value)
        except OSError as e:
            raise TpiError(f"cgroup {group}: cannot write {value.strip()!r} to {filename}: {e.strerror}") from None

    def _mkdir(self, parent: Path) -> Path:
        group = parent / self.name
        try:
            group.mkdir()
        except FileExistsError:
            raise TpiError(f"cgroup {group} already exists (a previous run not cleaned up, or a name clash)") from None
        except OSError as e:
            raise TpiError(f"cannot create cgroup {group}: {e.strerror}") from None
        self.created.append(group)
        return group

    # -- lifecycle -----------------------------------------------------------------------------------
    def open(self) -> "DeviceCgroup":
        try:
            if self.v2:
                self._open_v2()
            else:
                self._open_v1()
        except BaseException:
            self.close()
            raise
        return self

    def _open_v2(self) -> None:
        wanted = [c for c, on in (("memory", self.mem_bytes is not None), ("cpu", self.cpus is not None)) if on]
        available = (self.root / "cgroup.controllers").read_text().split()
        missing = [c for c in wanted if c not in available]
        if missing:
            raise TpiError(f"--cgroup-root: {self.root} does not offer the {', '.join(missing)} controller(s) "
                           f"(cgroup.controllers: {' '.join(available) or 'none'})")
        sub = self.root / "cgroup.subtree_control"
        enabled = sub.read_text().split() if sub.exists() else []
        todo = [c for c in wanted if c not in enabled]
        if todo:
            try:
                sub.write_text(" ".join(f"+{c}" for c in todo))
            except OSError as e:
                raise TpiError(f"--cgroup-root: cannot enable {', '.join(todo)} in {sub}: {e.strerror} "
                               f"(a cgroup that holds processes cannot delegate controllers)") from None
        self.group = self._mkdir(self.root)
        if self.mem_bytes is not None:
            self._write(self.group, "memory.max", f"{self.mem_bytes}\n")
        if self.cpus is not None:
            self._write(self.group, "cpu.max", f"{int(self.cpus * self.PERIOD_US)} {self.PERIOD_US}\n")

    def _open_v1(self) -> None:
        self.group = self._mkdir(self.root)
        if self.mem_bytes is not None:
            self._write(self.group, "memory.limit_in_bytes", f"{self.mem_bytes}\n")
        self.cpu_group = None
        if self.cpus is not None:
            if self.cpu_root is None or not (self.cpu_root / "cpu.cfs_quota_us").exists():
                raise TpiError("cgroup v1: limiting CPU needs --cgroup-cpu-root, a directory you own in the cpu "
                               "hierarchy (with cpu.cfs_quota_us)")
            self.cpu_group = self._mkdir(self.cpu_root)
            self._write(self.cpu_group, "cpu.cfs_period_us", f"{self.PERIOD_US}\n")
            self._write(self.cpu_group, "cpu.cfs_quota_us", f"{int(self.cpus * self.PERIOD_US)}\n")

    def add(self, pid: int) -> None:
        """Move process `pid` into the device's group(s)."""
        for group in self.created:
            self._write(group, "cgroup.procs", f"{pid}\n")

    def oom_kills(self) -> int:
        """How many times the kernel OOM-killed in this group (v2 memory.events; v1 memory.oom_control)."""
        try:
            if self.v2:
                text = (self.group / "memory.events").read_text()
                key = "oom_kill"
            else:
                text = (self.group / "memory.oom_control").read_text()
                key = "oom_kill"
        except OSError:
            return 0
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
        return 0

    def close(self) -> None:
        """Remove every group we created (innermost first), moving leftover processes to the parent."""
        errors = []
        for group in reversed(self.created):
            try:
                self._evacuate(group)
                for f in self._written.pop(group, []):
                    f.unlink(missing_ok=True)
                group.rmdir()
            except OSError as e:
                errors.append(f"{group}: {e.strerror}")
        self.created = []
        if errors:
            raise TpiError(f"could not remove cgroup(s) {'; '.join(errors)}")

    def _evacuate(self, group: Path) -> None:
        procs = group / "cgroup.procs"
        if not self.real or not procs.exists():
            return
        for pid in procs.read_text().split():
            try:
                (group.parent / "cgroup.procs").write_text(f"{pid}\n")
            except OSError as e:
                if e.errno != 3:  # ESRCH: it exited meanwhile
                    raise

    def __enter__(self) -> "DeviceCgroup":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
