"""Local worker processes of `tpi generate --devices N`: start, watch during start-up, reap.

Layer: dist (imports tpicore.errors and multiprocess only). Owns the life cycle of the N-1 processes the
master forks on its own host, and failing fast while the group forms: until the master says the group is
formed (`formed`), a worker that fails hands its one error line to the master through a pipe (bytes,
never pickled) instead of printing it (`report_failure`, in the worker), and a watcher thread notices the first worker
that exits, records its line, aborts the master's wait (a callback: shutting its listener) and stops the
other workers, so the run ends at once with that one line naming the failing rank, whatever the
allreduce algorithm. Must not know about models, shards or the wire format.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

import multiprocess as mp
from multiprocess.connection import wait as wait_any

WATCH_POLL_S = 0.05  # the watcher's poll period (for its stop flag; deaths wake it at once)
SETTLE_S = 1.0  # how long a failed rendezvous waits for the watcher to name a dying worker


class StartupChannel:
    """A worker's side: where its start-up failure goes (the master's pipe until the group is formed)."""

    def __init__(self, rank: int, conn: Any, formed: Any) -> None:
        self.rank, self.conn, self.formed = rank, conn, formed

    def report_failure(self, message: str) -> None:
        """Hand `message` (one line, without 'error: ') to the master before the group is formed; print it
        to stderr after (the master no longer waits on start-up then)."""
        if not self.formed.is_set():
            try:
                self.conn.send_bytes(message.encode("utf-8", "replace"))
                return
            except OSError:
                pass
        print(f"error: {message}", file=sys.stderr)


_channel: StartupChannel | None = None  # set in a worker process by `_child`, before its target runs


def startup_channel() -> StartupChannel | None:
    """This worker process's start-up channel (None outside a process that LocalWorkers started)."""
    return _channel


def _child(target: Callable[..., None], args: tuple, channel: StartupChannel) -> None:
    global _channel
    _channel = channel
    target(*args)


def report_failure(message: str) -> None:
    """A worker's one error line (without 'error: '): to the master while the group forms, else stderr."""
    if _channel is not None:
        _channel.report_failure(message)
    else:
        print(f"error: {message}", file=sys.stderr)


class LocalWorkers:
    """N-1 worker processes on this host; terminated and reaped on close, whatever happened."""

    def __init__(self) -> None:
        self.procs: list = []
        self._ranks: dict[int, int] = {}  # pid -> rank
        self._readers: dict[int, Any] = {}  # rank -> read end of its start-up pipe
        self._formed: Any = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.failure: str | None = None  # the first start-up failure's line, once the watcher saw it

    def start(self, target: Callable[..., None], args_per_rank: dict[int, tuple]) -> None:
        """Fork one process per rank running target(*args) (its failures: `report_failure`)."""
        ctx = mp.get_context("fork")
        self._formed = ctx.Event()
        for rank, args in args_per_rank.items():
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(target, args, StartupChannel(rank, writer, self._formed)),
                            name=f"tpi-rank-{rank}", daemon=True)
            p.start()
            writer.close()
            self.procs.append(p)
            self._ranks[p.pid] = rank
            self._readers[rank] = reader

    def watch(self, abort: Callable[[], None]) -> None:
        """Until `formed`: at the first worker exit, record its line, call `abort` and stop the others."""
        if not self.procs:
            return
        self._watcher = threading.Thread(target=self._watch, args=(abort,), name="tpi-worker-watch", daemon=True)
        self._watcher.start()

    def _watch(self, abort: Callable[[], None]) -> None:
        sentinels = {p.sentinel: p for p in self.procs}
        while sentinels and not self._stop.is_set():
            for s in wait_any(list(sentinels), timeout=WATCH_POLL_S):
                p = sentinels.pop(s)
                p.join(0.5)
                if self._stop.is_set():
                    return
                self.failure = self._line(p)
                try:
                    abort()
                finally:
                    for other in self.procs:
                        if other is not p and other.is_alive():
                            other.terminate()  # no line of their own: the first failure is the cause
                return

    def _line(self, p: Any) -> str:
        rank = self._ranks[p.pid]
        reader = self._readers[rank]
        try:
            if reader.poll(0.2):
                return reader.recv_bytes().decode("utf-8", "replace")
        except (EOFError, OSError):
            pass
        return f"rank {rank} exited with code {p.exitcode} before joining the group"

    def startup_failure(self, wait_s: float = SETTLE_S) -> str | None:
        """The first worker's start-up failure, waiting up to `wait_s` for the watcher to see one."""
        if self._watcher is not None:
            self._watcher.join(wait_s)
        return self.failure

    def formed(self) -> None:
        """The group is formed: workers print their own errors from now on; the watcher stops."""
        if self._formed is not None:
            self._formed.set()
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(2.0)

    def dead(self) -> list[tuple[int, int]]:
        return [(self._ranks[p.pid], p.exitcode) for p in self.procs if p.exitcode not in (None, 0)]

    def close(self, grace_s: float = 5.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for reader in self._readers.values():
            reader.close()
        self.procs, self._readers = [], {}
