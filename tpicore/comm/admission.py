"""Serving handshakes on a listener: concurrently, each under its own short deadline, a bounded number.

Owns the accept loop shared by the master's listener and every worker's mesh listener. Each accepted
connection gets a thread running handshake.accept_peer and a deadline of `handshake_timeout_s`; when it
passes, the connection is shut down (which wakes its thread), so an idle, slow or half-sent peer costs
one thread for a few seconds and delays nobody. At most `max_pending` handshakes run at once: a new
connection past the cap evicts the oldest pending one (a real peer finishes in milliseconds, and joiners
retry a connection dropped before its verdict). Ranks are claimed atomically, so two connections
claiming one rank cannot both win. Refusals are logged once per remote host, then at most once per
`log_interval_s` with a count of the ones left out; a refusal for other terms (handshake.Mismatch: a rank
with another model, world size or encryption setting) is only recorded for the timeout message, since the
refused rank reports it as its own error line (one line for the user, not two).

    accept loop (the caller's thread)             one thread per pending connection
      poll(listener, wakeup, next deadline)       accept_peer(sock, claim=...) -> Admitted | Refused
      accept -> start thread (evict oldest if full)   done: post the result, wake the loop
      shut down overdue connections
      until every expected rank is admitted or the rendezvous deadline passes

Knows nothing of groups (group.py) or of the protocol's messages (handshake.py).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tpicore.comm.endpoint import tune
from tpicore.comm.handshake import Admitted, Mismatch, Terms, accept_peer
from tpicore.errors import TpiError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # a real handshake is four small messages: milliseconds on any network
MAX_PENDING = 64


@dataclass(frozen=True)
class Joined:
    """A connection that completed the handshake: the socket is the caller's from now on."""

    sock: socket.socket
    peer: str
    admitted: Admitted


class RefusalLog:
    """Warnings about refused peers: the first per host, then one per interval with a count of the rest."""

    def __init__(self, what: str, interval_s: float = 30.0) -> None:
        self.what = what
        self.interval_s = interval_s
        self.last = ""  # the latest refusal, for the rendezvous' timeout message
        self._hosts: dict[str, tuple[float, int]] = {}  # host -> (last logged, refusals since)
        self._lock = threading.Lock()

    def record(self, reason: str) -> None:
        """A refusal the peer reports itself (handshake.Mismatch): kept for the timeout message, logged at
        info level only, so the user of a failing run sees the one error line of the refused rank."""
        with self._lock:
            self.last = reason
        log.info("%s refused a peer: %s", self.what, reason)

    def note(self, host: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.last = reason
            logged, skipped = self._hosts.get(host, (-float("inf"), 0))
            if now - logged < self.interval_s:
                self._hosts[host] = (logged, skipped + 1)
                return
            self._hosts[host] = (now, 0)
        more = f" ({skipped} more refusals from {host} since the last warning)" if skipped else ""
        log.warning("%s refused a peer: %s%s", self.what, reason, more)


class Admissions:
    """One rendezvous on one listener: admit each rank of `expected` once, by `deadline` (monotonic)."""

    def __init__(self, lst: socket.socket, *, my_rank: int, expected: set[int], terms: Terms,
                 secret: bytes | None, refusals: RefusalLog, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 max_pending: int = MAX_PENDING, on_join: Callable[[Joined], None] | None = None) -> None:
        self.on_join = on_join  # set: hand each joiner over at once and keep admitting (lobby.py) until stop()
        self._stopping = False
        self.lst = lst
        self.my_rank = my_rank
        self.expected = frozenset(expected)
        self.terms = terms
        self.secret = secret
        self.refusals = refusals
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        self._pending: dict[socket.socket, float] = {}  # connection -> its handshake deadline (insertion order)
        self._joined: dict[int, Joined] = {}
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def run(self, deadline: float, timeout_text: Callable[[list[int]], str]) -> dict[int, Joined]:
        """Every expected rank's connection, or TpiError(timeout_text(missing) + the last refusal)."""
        poller = select.poll()  # not select(): descriptors past 1024 are fine
        poller.register(self.lst, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return {}
                    if len(self._joined) == len(self.expected):
                        joined, self._joined = self._joined, {}
                        return joined
                    missing = sorted(self.expected - self._joined.keys())
                now = time.monotonic()
                if now >= deadline:
                    hint = f"; last refusal: {self.refusals.last}" if self.refusals.last else ""
                    raise TpiError(timeout_text(missing) + hint)
                self._reap(now)
                with self._lock:
                    next_due = min(self._pending.values(), default=deadline)
                wait_ms = int(max(min(deadline, next_due) - now, 0.0) * 1000) + 1
                ready = {fd for fd, _ in poller.poll(wait_ms)}
                if self._wake_r.fileno() in ready:
                    self._drain_wakeups()
                if self.lst.fileno() in ready:
                    self._accept()
        finally:
            self._close()

    def stop(self) -> None:
        """End a run() from another thread (it returns what it holds: nothing, with on_join)."""
        with self._lock:
            self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the accept loop's helpers -------------------------------------------------------------------------
    def _accept(self) -> None:
        self.lst.setblocking(False)
        try:
            conn, addr = self.lst.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            raise TpiError(f"accepting connections on {self.lst.getsockname()[:2]} failed: "
                           f"{e.strerror or e}") from None
        conn.setblocking(True)
        tune(conn)
        peer = f"peer {addr[0]}:{addr[1]}"
        with self._lock:
            if len(self._pending) >= self.max_pending:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                _shutdown(oldest)
                self.refusals.note(addr[0], f"more than {self.max_pending} handshakes pending; dropped the oldest")
            self._pending[conn] = time.monotonic() + self.handshake_timeout_s
        conn.settimeout(self.handshake_timeout_s)
        threading.Thread(target=self._serve, args=(conn, addr[0], peer), daemon=True,
                         name=f"tpi-handshake-{addr[0]}:{addr[1]}").start()

    def _reap(self, now: float) -> None:
        """Shut down every connection whose handshake deadline has passed (its thread then gives up)."""
        with self._lock:
            overdue = [c for c, due in self._pending.items() if due <= now]
            for conn in overdue:
                del self._pending[conn]
        for conn in overdue:
            _shutdown(conn)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _close(self) -> None:
        """End of the rendezvous: drop every handshake still running and every unclaimed join."""
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), {}
            leftovers, self._joined = list(self._joined.values()), {}
        for conn in pending:
            _shutdown(conn)
        for j in leftovers:
            j.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- one connection, in its own thread -----------------------------------------------------------------
    def _claim(self, rank: int) -> str | None:
        with self._lock:
            if self._closed:
                return f"rank {self.my_rank} is no longer accepting connections"
            if rank in self._claimed:
                return f"rank {rank} already joined (or not expected by rank {self.my_rank})"
            if rank not in self.expected:
                return f"rank {rank} already joined (or not expected by rank {self.my_rank})"
            self._claimed.add(rank)
            return None

    def _release(self, rank: int) -> None:
        with self._lock:
            self._claimed.discard(rank)

    def _serve(self, conn: socket.socket, host: str, peer: str) -> None:
        try:
            admitted = accept_peer(conn, my_rank=self.my_rank, terms=self.terms, secret=self.secret,
                                   claim=self._claim, release=self._release, peer=peer)
        except (TpiError, OSError) as e:
            with self._lock:
                timed_out = self._pending.pop(conn, None) is None
                closed = self._closed
            if not closed and isinstance(e, Mismatch) and not timed_out:
                self.refusals.record(str(e))
            elif not closed:
                reason = f"{peer} did not finish the handshake within {self.handshake_timeout_s:.1f} s" \
                    if timed_out else str(e)
                self.refusals.note(host, reason)
            conn.close()
        else:
            with self._lock:
                in_time = self._pending.pop(conn, None) is not None and not self._closed
                handoff = in_time and self.on_join is not None
                if handoff:
                    self._claimed.discard(admitted.rank)  # a lobby id may come back later
                elif in_time:
                    self._joined[admitted.rank] = Joined(conn, peer, admitted)
                    log.info("rank %d: rank %d joined from %s", self.my_rank, admitted.rank, peer)
            if handoff:
                self.on_join(Joined(conn, peer, admitted))
            if not in_time:  # shut down at its deadline or at the end, right after the WELCOME went out
                self._release(admitted.rank)
                conn.close()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
