"""The lobby: standby devices (spares, devices coming back) joining a master whose group already formed.

Layer: comm. Owns admitting members on the master's listener after the rendezvous (group.py) handed it
over, and the joiner's side. A member proves the shared secret with the same handshake as a rank (the
lobby's terms: world size LOBBY_WORLD, fingerprint LOBBY_FINGERPRINT, the group's encryption); its
HELLO rank is its member id (any id in 1..LOBBY_WORLD-1, e.g. random). The result is one Channel per
member (member id <-> rank 0), held here until the master takes it (tpicore.dist.failover assigns it a
rank and relabels the channel) or finds it gone. Which model a member holds is checked when it is given a
slice, not here. Must not know about models, layouts or the failover protocol's messages.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from tpicore.comm.admission import HANDSHAKE_TIMEOUT_S, Admissions, Joined, RefusalLog
from tpicore.comm.channel import DEFAULT_TIMEOUT_S, Channel
from tpicore.comm.endpoint import is_loopback, parse_addr
from tpicore.comm.group import Group, join_master
from tpicore.comm.handshake import Terms
from tpicore.errors import TpiError

log = logging.getLogger(__name__)

LOBBY_WORLD = 1 << 15  # member ids are 1..LOBBY_WORLD-1
LOBBY_FINGERPRINT = "tpi-lobby"
_RUN_S = 3600.0  # one Admissions run; the lobby starts another until stopped
JOIN_BUDGET_S = 60.0  # a spare may start before the master: it keeps trying this long (or its timeout)


def lobby_terms(secret: bytes | None, encrypt: bool, host: str) -> Terms:
    if not is_loopback(host) and secret is None:
        raise TpiError(f"the lobby on {host} is not on loopback: a shared secret is required")
    return Terms(LOBBY_WORLD, LOBBY_FINGERPRINT, sealed=encrypt and secret is not None)


class Lobby:
    """Admits standby members on `lst` in a background thread until close(); `take()` hands them over."""

    def __init__(self, lst: socket.socket, *, secret: bytes | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 encrypt: bool = True, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.lst, self.secret, self.timeout_s = lst, secret, timeout_s
        self.terms = lobby_terms(secret, encrypt, lst.getsockname()[0])
        self._lock = threading.Lock()
        self._waiting: list[Channel] = []
        self._closed = False
        self._doors: Admissions | None = None
        self._handshake_timeout_s = handshake_timeout_s
        self._thread = threading.Thread(target=self._run, name="tpi-lobby", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._doors = Admissions(self.lst, my_rank=0, expected=set(range(1, LOBBY_WORLD)), terms=self.terms,
                                         secret=self.secret, refusals=RefusalLog("master (lobby)"),
                                         handshake_timeout_s=self._handshake_timeout_s, on_join=self._joined)
            try:
                self._doors.run(time.monotonic() + _RUN_S, lambda missing: "lobby run ended")
            except TpiError:
                pass
            except OSError:
                return  # the listener is gone

    def _joined(self, j: Joined) -> None:
        ch = Channel(j.sock, rank=0, peer_rank=j.admitted.rank, timeout_s=self.timeout_s, cipher=j.admitted.cipher)
        with self._lock:
            if self._closed:
                ch.close()
                return
            self._waiting.append(ch)
        log.info("a standby device (member %d) joined from %s", j.admitted.rank, j.peer)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def take(self) -> list[Channel]:
        """Every member waiting now (the caller checks they are alive, assigns or closes them)."""
        with self._lock:
            out, self._waiting = self._waiting, []
        return out

    def give_back(self, channels: list[Channel]) -> None:
        """Members taken but not used: they wait here again."""
        with self._lock:
            self._waiting = channels + self._waiting

    def close(self) -> None:
        with self._lock:
            self._closed = True
            doors, waiting, self._waiting = self._doors, self._waiting, []
        if doors is not None:
            doors.stop()
        self._thread.join(5.0)
        for ch in waiting:
            ch.close()
        self.lst.close()


def join_lobby(master_addr: str | tuple[str, int], member_id: int, *, secret: bytes | None,
               timeout_s: float = DEFAULT_TIMEOUT_S, encrypt: bool = True) -> Group:
    """A standby member's side: join the master's lobby (retrying refusals, e.g. while the master is still
    forming its group, for max(JOIN_BUDGET_S, timeout_s)); returns a one-channel Group (member <-> rank 0)."""
    if not 1 <= member_id < LOBBY_WORLD:
        raise TpiError(f"member id must be in 1..{LOBBY_WORLD - 1}, got {member_id}")
    addr = parse_addr(master_addr)
    terms = lobby_terms(secret, encrypt, addr[0])
    budget_s = max(JOIN_BUDGET_S, timeout_s)
    deadline = time.monotonic() + budget_s
    while True:
        try:
            ch = join_master(addr, deadline, rank=member_id, terms=terms, secret=secret, timeout_s=timeout_s)
            return Group(member_id, LOBBY_WORLD, {0: ch}, timeout_s=timeout_s)
        except TpiError as e:
            if time.monotonic() + 0.5 >= deadline:
                raise TpiError(f"could not join the master's lobby at {addr[0]}:{addr[1]} within "
                               f"{budget_s:.1f} s: {e}") from None
            time.sleep(0.5)
