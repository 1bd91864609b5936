"""The link schedule: the shared state of one emulated network, one growable file on /dev/shm mapped by
every device process.

Owns the memory layout and its growth, the cross-process lock, the busy intervals of every link
(`reserve`), and -- for virtual clocks -- the messages in flight and each device's published progress,
which the causal resolver (causal.py) reads and writes. Decides no delivery time itself (shaper.py and
causal.py do) and knows nothing of topologies beyond the number of links. Must not import the shaper.

Layout, in float64 slots; every table grows by doubling when it is full, so nothing is ever dropped or
overwritten for lack of room (the old layout kept 16 reservations per link and lost the rest):

    header   magic, generation, capacities (ranks, intervals per link, messages), counters
    ranks    per device: state (unset / running / waiting / done), now, the source it waits for, pid,
             live shapers, next message id
    pairs    per (src, dst): messages sent, messages received
    vlinks   per link, virtual time: interval count, last t_send booked, sorted busy intervals (start, end)
    wlinks   per link, wall time (perf_counter seconds): the same; kept apart so one schedule can serve a
             virtual and a wall phase (the allreduce sweep does)
    msgs     per message in flight (virtual time): used, src, dst, seq, id, t_send, nbytes, resolved,
             t_deliver, topology fingerprint, seed

A process that finds a newer generation in the header (someone grew a table) remaps before reading.
Create the schedule in the parent before starting devices; children get it by fork, by pickling (it
pickles as its path and re-attaches), or by `LinkSchedule.attach(path, n_links)`. The creator removes
the file (and the wake-up FIFOs in tpi-wake-X next to it) on close().
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import select
import shutil
import stat
import tempfile
import threading
import weakref
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from tpicore.errors import TpiError

MAGIC = 7.5e9 + 11.0  # marks a file written by this layout
HEADER_SLOTS = 16
H_MAGIC, H_GEN, H_LINKS, H_RANKS, H_LINK_CAP, H_MSG_CAP, H_MSGS, H_VIOLATIONS, H_FORCED = range(9)

# ranks: state values
UNSET, RUNNING, WAITING, DONE = 0.0, 1.0, 2.0, 3.0
R_STATE, R_NOW, R_WAIT, R_PID, R_LIVE, R_NEXT = range(6)
RANK_SLOTS = 6
PAIR_SLOTS = 2  # sent, received
M_USED, M_SRC, M_DST, M_SEQ, M_ID, M_TSEND, M_NBYTES, M_RESOLVED, M_TDELIVER, M_FP, M_SEED = range(11)
MSG_SLOTS = 11
L_COUNT, L_LAST = 0, 1  # then (start, end) pairs
LINK_HEAD = 2

START_RANKS, START_INTERVALS, START_MSGS = 8, 32, 64
WAKE_POLL_S = 0.05  # a waiter re-checks at least this often (a device process that died wakes nobody)


@dataclass(frozen=True)
class Layout:
    """Where each table starts, for given capacities (all in float64 slots; offsets computed once)."""

    n_links: int
    ranks: int
    intervals: int
    msgs: int
    link_row: int = field(init=False)
    ranks_at: int = field(init=False)
    pairs_at: int = field(init=False)
    vlinks_at: int = field(init=False)
    wlinks_at: int = field(init=False)
    msgs_at: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        at = {"link_row": LINK_HEAD + 2 * self.intervals, "ranks_at": HEADER_SLOTS}
        at["pairs_at"] = at["ranks_at"] + RANK_SLOTS * self.ranks
        at["vlinks_at"] = at["pairs_at"] + PAIR_SLOTS * self.ranks * self.ranks
        at["wlinks_at"] = at["vlinks_at"] + at["link_row"] * self.n_links
        at["msgs_at"] = at["wlinks_at"] + at["link_row"] * self.n_links
        at["slots"] = at["msgs_at"] + MSG_SLOTS * self.msgs
        for k, x in at.items():
            object.__setattr__(self, k, x)

    def rank(self, r: int) -> int:
        return self.ranks_at + RANK_SLOTS * r

    def pair(self, src: int, dst: int) -> int:
        return self.pairs_at + PAIR_SLOTS * (src * self.ranks + dst)

    def link(self, index: int, virtual: bool) -> int:
        return (self.vlinks_at if virtual else self.wlinks_at) + self.link_row * index

    def msg(self, slot: int) -> int:
        return self.msgs_at + MSG_SLOTS * slot


def _relayout(old: list[float], a: Layout, b: Layout) -> list[float]:
    """The contents of layout `a` moved into layout `b` (capacities only ever grow)."""
    new = [0.0] * b.slots
    new[:HEADER_SLOTS] = old[:HEADER_SLOTS]
    new[b.ranks_at:b.ranks_at + RANK_SLOTS * a.ranks] = old[a.ranks_at:a.ranks_at + RANK_SLOTS * a.ranks]
    for src in range(a.ranks):
        for dst in range(a.ranks):
            new[b.pair(src, dst):b.pair(src, dst) + PAIR_SLOTS] = old[a.pair(src, dst):a.pair(src, dst) + PAIR_SLOTS]
    for virtual in (True, False):
        for i in range(a.n_links):
            new[b.link(i, virtual):b.link(i, virtual) + a.link_row] = old[a.link(i, virtual):a.link(i, virtual) + a.link_row]
    new[b.msgs_at:b.msgs_at + MSG_SLOTS * a.msgs] = old[a.msgs_at:a.msgs_at + MSG_SLOTS * a.msgs]
    new[H_RANKS], new[H_LINK_CAP], new[H_MSG_CAP] = b.ranks, b.intervals, b.msgs
    new[H_GEN] = old[H_GEN] + 1
    return new


class LinkSchedule:
    """The shared state (see the module docstring). Use `locked()` around every read and write."""

    def __init__(self, path: str, n_links: int, owner: bool = False) -> None:
        self.path, self.n_links, self.owner = path, n_links, owner
        self.doorbells = Doorbells(fifo_dir(path))  # wake-ups, one FIFO per rank
        self._mm: mmap.mmap | None = None
        self.v: memoryview | None = None  # the float64 view; valid inside locked()
        self.layout: Layout | None = None
        self._gen = -1.0
        self._open_lock()
        with self.locked():
            if self.v[H_MAGIC] != MAGIC:
                raise TpiError(f"link schedule {path}: not a link schedule file")
            if int(self.v[H_LINKS]) != n_links:
                raise TpiError(f"link schedule {path}: has {int(self.v[H_LINKS])} links, expected {n_links}")
        # the creator removes the files on close(), or at the latest when it exits or drops the object
        self._unlink = weakref.finalize(self, _unlink_in, path, os.getpid()) if owner else None

    # -- creating and attaching ------------------------------------------------------------------------
    @classmethod
    def create(cls, n_links: int) -> "LinkSchedule":
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="tpi-links-", dir=shm)
        try:
            lay = Layout(n_links, START_RANKS, START_INTERVALS, START_MSGS)
            init = [0.0] * lay.slots
            init[H_MAGIC], init[H_LINKS] = MAGIC, n_links
            init[H_RANKS], init[H_LINK_CAP], init[H_MSG_CAP] = lay.ranks, lay.intervals, lay.msgs
            os.write(fd, array("d", init).tobytes())
            os.mkdir(fifo_dir(path), 0o700)
        finally:
            os.close(fd)
        return cls(path, n_links, owner=True)

    @classmethod
    def attach(cls, path: str, n_links: int) -> "LinkSchedule":
        return cls(path, n_links, owner=False)

    def __getstate__(self) -> dict:
        return {"path": self.path, "n_links": self.n_links}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["n_links"], owner=False)

    def _open_lock(self) -> None:
        # flock belongs to an open file description: after fork the child must open its own, or parent
        # and child would both "hold" it. The thread lock covers threads of one process (same fd).
        self._pid = os.getpid()
        self._fd = os.open(self.path, os.O_RDWR)
        self._tlock = threading.RLock()
        self._depth = 0

    # -- locking and mapping ---------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator["LinkSchedule"]:
        """Exclusive access across processes and threads; remaps first if another process grew a table.
        Re-entrant within one thread."""
        self._after_fork()
        with self._tlock:
            self._depth += 1
            if self._depth == 1:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if self._depth == 1:
                    self._map()
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _after_fork(self) -> None:
        """A forked child opens its own lock file description and FIFO handles (the parent's stay its own)."""
        if os.getpid() != self._pid:
            self._release_map()
            os.close(self._fd)
            self._open_lock()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _map(self) -> None:
        if self.v is not None and self.v[H_GEN] == self._gen:
            return
        self._release_map()
        size = os.fstat(self._fd).st_size
        self._mm = mmap.mmap(self._fd, size)
        self.v = memoryview(self._mm).cast("d")
        self._gen = self.v[H_GEN]
        self.layout = Layout(int(self.v[H_LINKS]), int(self.v[H_RANKS]), int(self.v[H_LINK_CAP]),
                             int(self.v[H_MSG_CAP]))

    def _release_map(self) -> None:
        if self.v is not None:
            self.v.release()
            self.v = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def grow(self, ranks: int | None = None, intervals: int | None = None, msgs: int | None = None) -> None:
        """Enlarge tables (inside locked()): rewrite the file in the new layout and bump the generation."""
        a = self.layout
        b = Layout(a.n_links, max(a.ranks, ranks or 0), max(a.intervals, intervals or 0), max(a.msgs, msgs or 0))
        if b == a:
            return
        new = _relayout(self.v.tolist(), a, b)
        self._release_map()
        os.ftruncate(self._fd, 8 * b.slots)
        self._mm = mmap.mmap(self._fd, 8 * b.slots)
        self.v = memoryview(self._mm).cast("d")
        self.v[:] = array("d", new)
        self._gen, self.layout = self.v[H_GEN], b

    def reset(self) -> None:
        """Forget every reservation, message and device state (between runs that reuse the schedule)."""
        with self.locked():
            lay = self.layout
            self.v[lay.ranks_at:lay.slots] = array("d", bytes(8 * (lay.slots - lay.ranks_at)))
            self.v[H_MSGS] = self.v[H_VIOLATIONS] = self.v[H_FORCED] = 0.0

    # -- ranks -------------------------------------------------------------------------------------------
    def ensure_rank(self, rank: int) -> None:
        if rank >= self.layout.ranks:
            cap = self.layout.ranks
            while cap <= rank:
                cap *= 2
            self.grow(ranks=cap)

    def rank_row(self, rank: int) -> int:
        self.ensure_rank(rank)
        return self.layout.rank(rank)

    # -- link intervals ------------------------------------------------------------------------------------
    def reserve(self, link: int, earliest: float, size_s: float, min_finish: float, virtual: bool,
                forget_before: float) -> tuple[float, float]:
        """Book `link` for a transmission of `size_s` seconds that cannot end before `min_finish`: the
        earliest start >= `earliest` whose interval [start, max(start + size_s, min_finish)] overlaps no
        booking. Intervals ending at or before `forget_before` may be dropped (no later booking can reach
        back to them). Records the booking; returns (start, finish). Call inside locked().

        Bookings are kept sorted (they never overlap, so by start and by end alike): bisection finds the
        first one that matters, and a new booking usually lands at the end (no shifting)."""
        v = self.v
        base = self.layout.link(link, virtual)
        n = int(v[base + L_COUNT])
        head = base + LINK_HEAD
        ends = v[head + 1:head + 2 * n:2]  # a strided view: bisection reads log(n) values, copies nothing
        try:
            start = earliest
            pos = bisect.bisect_right(ends, earliest)  # bookings before pos end by `earliest`: no conflict
            while pos < n:
                if max(start + size_s, min_finish) <= v[head + 2 * pos]:
                    break
                start, pos = max(start, ends[pos]), pos + 1
            drop = bisect.bisect_right(ends, forget_before, 0, pos)
        finally:
            ends.release()  # a live view would pin the map (grow() remaps)
        finish = max(start + size_s, min_finish)
        if drop < 64 and n < self.layout.intervals:
            drop = 0  # forgetting shifts the whole row: do it in batches
        tail = v[head + 2 * pos:head + 2 * n].tolist()
        n_new = n - drop + 1
        if n_new > self.layout.intervals:
            cap = self.layout.intervals
            while cap < n_new:
                cap *= 2
            self.grow(intervals=cap)
            v = self.v
            base = self.layout.link(link, virtual)
            head = base + LINK_HEAD
        if drop:
            kept = v[head + 2 * drop:head + 2 * pos].tolist()
            v[head:head + len(kept)] = array("d", kept)
        at = head + 2 * (pos - drop)
        v[at:at + 2 + len(tail)] = array("d", [start, finish] + tail)
        v[base + L_COUNT] = n_new
        return start, finish

    def intervals(self, link: int, virtual: bool) -> list[tuple[float, float]]:
        """The bookings of one link (inside locked()), for reports and tests."""
        base = self.layout.link(link, virtual)
        n = int(self.v[base + L_COUNT])
        flat = self.v[base + LINK_HEAD:base + LINK_HEAD + 2 * n].tolist()
        return list(zip(flat[0::2], flat[1::2]))

    # -- messages (virtual time) -------------------------------------------------------------------------
    def add_message(self, fields: list[float]) -> int:
        """Store a message record (MSG_SLOTS values, M_USED set here) in a free slot; returns the slot."""
        lay = self.layout
        try:
            slot = self.v[lay.msgs_at:lay.slots:MSG_SLOTS].tolist().index(0.0)  # no view kept: it would pin the map
        except ValueError:
            slot = lay.msgs
            self.grow(msgs=2 * lay.msgs)
            lay = self.layout
        at = lay.msg(slot)
        self.v[at:at + MSG_SLOTS] = array("d", fields)
        self.v[at + M_USED] = 1.0
        self.v[H_MSGS] += 1
        return slot

    def messages(self) -> list[tuple[int, list[float]]]:
        """(slot, record) of every message in flight (inside locked())."""
        if not self.v[H_MSGS]:
            return []
        lay = self.layout
        flat = self.v[lay.msgs_at:lay.slots].tolist()
        return [(s, flat[s * MSG_SLOTS:(s + 1) * MSG_SLOTS]) for s in range(lay.msgs) if flat[s * MSG_SLOTS]]

    def drop_message(self, slot: int) -> None:
        at = self.layout.msg(slot)
        self.v[at:at + MSG_SLOTS] = array("d", bytes(8 * MSG_SLOTS))
        self.v[H_MSGS] -= 1

    # -- counters ------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        with self.locked():
            return {"in_flight": int(self.v[H_MSGS]), "violations": int(self.v[H_VIOLATIONS]),
                    "forced": int(self.v[H_FORCED])}

    def close(self) -> None:
        if self._fd < 0:
            return
        self._release_map()
        if self._pid == os.getpid():
            os.close(self._fd)
        self.doorbells.close()
        self._fd = -1
        if self._unlink is not None:
            self._unlink()

    def __enter__(self) -> "LinkSchedule":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Doorbells:
    """Wake-ups between device processes: a FIFO per rank in one directory. A waiter reads its own (never
    blocking the writers); whoever books a message writes a byte into its receiver's. Per process: a
    forked child opens its own write ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._pid = os.getpid()
        self._fds: dict[int, int] = {}

    def reader(self, rank: int) -> int:
        """Open (creating if needed) rank's FIFO for reading; never blocks."""
        path = os.path.join(self.directory, f"r{rank}")
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise TpiError(f"link schedule: {path} is not a FIFO")
        return os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def ring(self, ranks: set[int]) -> None:
        """Nudge the waiters of `ranks` (a full FIFO is nudged already; no FIFO: nobody waits there yet)."""
        if os.getpid() != self._pid:
            self._pid, self._fds = os.getpid(), {}
        for r in ranks:
            fd = self._fds.get(r)
            if fd is None:
                try:
                    fd = os.open(os.path.join(self.directory, f"r{r}"), os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                self._fds[r] = fd
            try:
                os.write(fd, b"w")
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    os.close(fd)
                    del self._fds[r]

    @staticmethod
    def wait(reader_fd: int, timeout_s: float) -> bool:
        """Wait until nudged (True) or `timeout_s` passed (False); drains the FIFO."""
        ready, _, _ = select.select([reader_fd], [], [], timeout_s)
        if ready:
            try:
                while os.read(reader_fd, 4096):
                    pass
            except BlockingIOError:
                pass
        return bool(ready)

    def close(self) -> None:
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


def fifo_dir(path: str) -> str:
    """Where the wake-up FIFOs of the schedule at `path` live: /dev/shm/tpi-links-X -> /dev/shm/tpi-wake-X."""
    head, name = os.path.split(path)
    return os.path.join(head, name.replace("tpi-links-", "tpi-wake-", 1) if name.startswith("tpi-links-")
                        else name + ".wake")


def _unlink_in(path: str, creator_pid: int) -> None:
    """Remove the schedule's file and FIFOs, but only from the process that created them (not forked children)."""
    if os.getpid() == creator_pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        shutil.rmtree(fifo_dir(path), ignore_errors=True)
