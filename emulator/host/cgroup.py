"""Kernel-enforced per-device memory caps: one child cgroup per device, only under a root the user gives.

    --cgroup-root DIR / options.cgroup_root     a cgroup directory the user owns:
        cgroup v2  DIR has cgroup.controllers (memory offered, and cpu for a CPU limit)
        cgroup v1  DIR is in the memory hierarchy (has memory.limit_in_bytes)
    DeviceCgroup(DIR, name, mem_bytes, cpus)    creates DIR/name, writes the cap, moves the device in,
                                                and removes DIR/name again on close -- whatever happened.
                                                Nothing is created anywhere but under DIR.

What the kernel counts (and what the cap therefore means under a cgroup): every page charged to the
device's group -- its anonymous memory and the page cache of the files it reads or maps. A page is
charged to the group that first faults it in, so before a device starts the supervisor drops the page
cache of that device's own weight files (`evict_page_cache`): its reads then fault them into its own
group, not into the preparer's or the supervisor's (the audit saw 7.5 MB charged while RSS was 202 MiB).
Pages the device shares with the host (the interpreter and libraries inherited at fork, copy-on-write)
stay charged where they were; the watchdog (emulator/host/limits.py), which runs beside every cgroup
with the same cap on RSS, counts them. Under the cap the kernel reclaims page cache (and clean mapped
file pages) before it OOM-kills, as on a device with that much RAM; swap is not modelled: memsw (v1) /
memory.swap.max (v2) are held to the same cap / 0 where the kernel has them.

CPU: v2 cpu.max when asked (cpus); v1 only with a cpu_root in the cpu hierarchy (the emulator gives
none: on v1 a device's cores are its CPU affinity and BLAS threads, emulator/host/limits.py).

Layer: host. Must not import emulator.results, run or figures, nor NumPy.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable

from tpicore.errors import TpiError

CGROUP = "cgroup"  # OomStop.by: the kernel OOM-killed the device in its group


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


def cgroup_version(root: str | os.PathLike) -> int:
    """2 for a cgroup v2 directory (cgroup.controllers), 1 for a v1 memory directory (memory.limit_in_bytes)."""
    root = Path(root)
    if not root.is_dir():
        raise TpiError(f"--cgroup-root: {root} is not a directory")
    if (root / "cgroup.controllers").exists():
        return 2
    if (root / "memory.limit_in_bytes").exists():
        return 1
    raise TpiError(f"--cgroup-root: {root} is neither a cgroup v2 directory (no cgroup.controllers) "
                   f"nor a cgroup v1 memory directory (no memory.limit_in_bytes)")


def _regular_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        elif p.is_file():
            out.append(p)
    return out


def evict_page_cache(paths: Iterable[str | os.PathLike]) -> int:
    """Drop the page cache of the files at `paths` (folders: every file under them): written back
    (fdatasync), then POSIX_FADV_DONTNEED, so the next reader faults them in and is charged for them.
    Pages some process still maps stay. Returns the size of the files advised (bytes)."""
    total = 0
    for f in _regular_files(paths):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError as e:
            raise TpiError(f"{f}: cannot open to drop its page cache: {e.strerror}") from None
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


class DeviceCgroup:
    """A child cgroup `root/name` limiting one device's memory (and CPU, v2), removed on close.

    root:      a cgroup directory the caller owns. cgroup v2 if it has `cgroup.controllers`; else v1,
               where `root` is in the memory hierarchy (has memory.limit_in_bytes) and `cpu_root`
               (optional) is the caller's directory in the cpu hierarchy (has cpu.cfs_quota_us).
    mem_bytes: memory.max (v2) / memory.limit_in_bytes (v1); None leaves memory unlimited.
    cpus:      CPU bandwidth in cores, cpu.max "cpus*period period" (v2) / cfs_quota_us (v1, cpu_root only).

        with DeviceCgroup(args.cgroup_root, "d3", mem_bytes=8 << 30) as cg:
            cg.add(proc.pid)
            proc.wait()
            killed, peak = cg.oom_kills(), cg.peak_bytes()

    On close, processes still in the group are moved back to the parent group before it is removed (on
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
        if not name or "/" in name or name in (".", ".."):
            raise TpiError(f"cgroup name: expected a plain name, got {name!r}")
        if mem_bytes is not None and mem_bytes <= 0:
            raise TpiError(f"mem_bytes: must be > 0, got {mem_bytes}")
        if cpus is not None and cpus <= 0:
            raise TpiError(f"cpus: must be > 0, got {cpus}")
        self.v2 = cgroup_version(self.root) == 2
        self.real = _fs_type(self.root) in ("cgroup2", "cgroup")
        self.created: list[Path] = []  # groups we made, removed in close()
        self._written: dict[Path, list[Path]] = {}  # fake root only: files we created per group
        self.group = self.root / name

    # -- helpers -------------------------------------------------------------------------------------
    def _write(self, group: Path, filename: str, value: str, optional: bool = False) -> bool:
        """Write an interface file; an `optional` one the kernel (or a fake root) lacks is skipped."""
        path = group / filename
        if not path.exists():
            if optional:
                return False
            if self.real:
                raise TpiError(f"cgroup {group}: no {filename} (is the controller enabled for this subtree?)")
            self._written.setdefault(group, []).append(path)
        try:
            path.write_text(value)
        except OSError as e:
            raise TpiError(f"cgroup {group}: cannot write {value.strip()!r} to {filename}: {e.strerror}") from None
        return True

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

    def _read_int(self, filename: str) -> int | None:
        try:
            return int((self.group / filename).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

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
            self._write(self.group, "memory.swap.max", "0\n", optional=True)  # no swap model
        if self.cpus is not None:
            self._write(self.group, "cpu.max", f"{int(self.cpus * self.PERIOD_US)} {self.PERIOD_US}\n")

    def _open_v1(self) -> None:
        if self.cpus is not None and (self.cpu_root is None or not (self.cpu_root / "cpu.cfs_quota_us").exists()):
            raise TpiError("cgroup v1: a CPU limit needs cpu_root, a directory you own in the cpu hierarchy "
                           "(with cpu.cfs_quota_us)")
        self.group = self._mkdir(self.root)
        if self.mem_bytes is not None:
            self._write(self.group, "memory.limit_in_bytes", f"{self.mem_bytes}\n")
            # memory+swap to the same cap (no swap model); at least the memory limit, so written after it
            self._write(self.group, "memory.memsw.limit_in_bytes", f"{self.mem_bytes}\n", optional=True)
        self.cpu_group = None
        if self.cpus is not None:
            self.cpu_group = self._mkdir(self.cpu_root)
            self._write(self.cpu_group, "cpu.cfs_period_us", f"{self.PERIOD_US}\n")
            self._write(self.cpu_group, "cpu.cfs_quota_us", f"{int(self.cpus * self.PERIOD_US)}\n")

    def add(self, pid: int) -> None:
        """Move process `pid` into the device's group(s)."""
        for group in self.created:
            self._write(group, "cgroup.procs", f"{pid}\n")

    # -- what the kernel saw -------------------------------------------------------------------------
    def oom_kills(self) -> int:
        """How many times the kernel OOM-killed in this group (v2 memory.events; v1 memory.oom_control)."""
        try:
            text = (self.group / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "oom_kill":
                return int(parts[1])
        return 0

    def usage_bytes(self) -> int | None:
        """Bytes charged to the group now (memory.current / memory.usage_in_bytes)."""
        return self._read_int("memory.current" if self.v2 else "memory.usage_in_bytes")

    def peak_bytes(self) -> int | None:
        """The kernel's high-water mark of the group's charge (memory.peak / memory.max_usage_in_bytes);
        None where the kernel does not keep one (v2 before Linux 5.19)."""
        return self._read_int("memory.peak" if self.v2 else "memory.max_usage_in_bytes")

    # -- teardown ------------------------------------------------------------------------------------
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
                if e.errno != errno.ESRCH:  # it exited meanwhile
                    raise

    def __enter__(self) -> "DeviceCgroup":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
