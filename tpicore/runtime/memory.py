"""Memory as the kernel sees it: resident set (now and peak) and page-cache use of given files.

Owns reading /proc/<pid>/status and asking the kernel which pages of a file are cached (mincore on a
fresh read-only mapping, which faults nothing in). Linux only; elsewhere the functions return 0 / None.

RSS and page cache are reported apart on purpose: the paper's peak memory is process RSS, while a
memory-mapped or cached checkpoint can hold gigabytes in the page cache that RSS does not show (or
shows as RssFile when mapped). The window scheduler reads into anonymous memory and drops the cache
behind it, so its RSS is honest and its page-cache use stays near zero.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
from typing import Iterable

import numpy as np

_FIELDS = {"VmHWM": "peak_rss_bytes", "VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes",
           "RssFile": "rss_file_bytes", "RssShmem": "rss_shmem_bytes"}


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS and its anon/file/shmem parts of a process, in bytes ({} if unreadable)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(rest.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out


def peak_rss_bytes(pid: int | str = "self") -> int:
    """High-water mark of the resident set (VmHWM); falls back to getrusage for this process."""
    v = proc_status(pid).get("peak_rss_bytes")
    if v is None and pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v or 0


def rss_bytes(pid: int | str = "self") -> int:
    return proc_status(pid).get("rss_bytes", 0)


_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def cached_bytes(path: str) -> int | None:
    """Bytes of `path` in the page cache right now (like `fincore`), or None where mincore is unavailable."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 0
        libc = _get_libc()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n_pages = -(-size // page)
            vec = (ctypes.c_ubyte * n_pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))  # bit 0: page cached
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * page, size)


def page_cache_bytes(paths: Iterable[str]) -> int:
    """Total page-cache bytes of the given files (each counted once)."""
    total = 0
    for p in sorted(set(paths)):
        total += cached_bytes(p) or 0
    return total


def memory_report(paths: Iterable[str] = ()) -> dict[str, int]:
    """Peak and current RSS (with anon/file split) plus the page cache held by `paths` (bytes)."""
    rep = proc_status()
    rep.setdefault("peak_rss_bytes", peak_rss_bytes())
    rep["page_cache_bytes"] = page_cache_bytes(paths)
    return rep
