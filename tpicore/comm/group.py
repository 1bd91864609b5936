"""A rank's group: its channels to the other ranks, and the rendezvous and mesh that build them.

Owns `Group` (rank, world size, channels, collective tags, receive scratch, abort/close) and the
master/worker rendezvous. Sums nothing (collectives.py), lays out no bytes (frame.py), and runs each
handshake through admission.py (acceptor) or handshake.join_peer (joiner).

Rendezvous (rank 0 = master; each handshake is the four messages of handshake.py):

    worker r                                       master
      | connect, handshake (retried if dropped)  -->  | admission: every connection concurrently, each
      |                                               |   under its own short deadline
      |   ... master waits until ranks 1..N-1 have joined (or its deadline) ...
      |                                     <-------  | CONTROL {mesh, peers: {rank: [host, port]}}
      | mesh: connect to every higher rank,           |
      |   admit every lower one (same handshake, same admission)
      | CONTROL {ready}                     ------->  | all ready -> Group.master returns

Security policy: with a secret every link is authenticated and, unless `encrypt=False`, every frame is
sealed (seal.py). Off loopback both are required: a group refuses to listen on, or connect to, a
non-loopback address without a secret and encryption.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable

import numpy as np

from tpicore.comm.admission import HANDSHAKE_TIMEOUT_S, Admissions, RefusalLog
from tpicore.comm.channel import (
    DEFAULT_TIMEOUT_S,
    ERROR_CLASSES,
    NO_LINK_HOOK,
    Channel,
    LinkHook,
    PeerLost,
    PeerTimeout,
)
from tpicore.comm.endpoint import connect, is_loopback, open_listener, parse_addr
from tpicore.comm.frame import DEFAULT_MAX_NBYTES, CommError, Kind, ProtocolError
from tpicore.comm.handshake import Terms, join_peer
from tpicore.comm.seal import FrameCipher
from tpicore.errors import TpiError

log = logging.getLogger(__name__)


class Group:
    """This rank's view of the device group: `rank`, `world_size`, `channels` (peer rank -> Channel)."""

    def __init__(self, rank: int, world_size: int, channels: dict[int, Channel], *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, mesh: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.channels = channels
        self.timeout_s = timeout_s
        self.mesh = mesh
        self.closed = False
        self.keep_on_failure = False  # failover: a failed collective leaves the channels open for a regroup
        self._seq = 0
        self._hook: LinkHook = NO_LINK_HOOK
        self._scratch: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world_size={self.world_size}, peers={sorted(self.channels)})"

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def link_hook(self) -> LinkHook:
        return self._hook

    @link_hook.setter
    def link_hook(self, hook: LinkHook | None) -> None:
        """The emulator's link hook on every channel; None restores the no-op default."""
        self._hook = NO_LINK_HOOK if hook is None else hook
        for ch in self.channels.values():
            ch.link_hook = self._hook

    def channel(self, peer: int) -> Channel:
        ch = self.channels.get(peer)
        if ch is None:
            if self.closed:
                raise TpiError(f"rank {self.rank}: the group is closed")
            raise TpiError(f"rank {self.rank} has no link to rank {peer} "
                           f"(ring and tree need a full mesh: build the group with mesh=True)")
        return ch

    def next_tag(self) -> int:
        """Sequence number of the next collective; every rank calls collectives in the same order."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def scratch(self, n: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """A reusable 1-d receive buffer of at least n items (grows, never shrinks); slice it to size."""
        key = np.dtype(dtype).str
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = self._scratch[key] = np.empty(n, dtype)
        return buf

    def abort(self, error: BaseException) -> None:
        """Tell every reachable peer why this rank gives up (ERROR frame, bounded wait), then close."""
        if self.closed or self.keep_on_failure:
            return
        reason = error.reason if isinstance(error, CommError) else str(error)
        name = type(error).__name__ if type(error).__name__ in ERROR_CLASSES else "TpiError"
        for ch in self.channels.values():
            ch.send_error(reason, name)
        self.close(bye=False)

    def close(self, bye: bool = True) -> None:
        """Close every socket. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for ch in self.channels.values():
            ch.close(bye=bye)
        self.channels = {}

    @classmethod
    def master(cls, world_size: int, host: str = "127.0.0.1", port: int = 0, *, secret: bytes | str | None = None,
               fingerprint: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, mesh: bool = True,
               listener: socket.socket | None = None, max_nbytes: int = DEFAULT_MAX_NBYTES,
               encrypt: bool = True, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
               keep_listener: bool = False) -> Group:
        """Rank 0: wait (until `timeout_s`) for ranks 1..N-1 to join, then wire the mesh if asked.

        Peers that fail the handshake are told why (as far as they may know), logged, and dropped; the
        master keeps waiting for valid ones until its deadline. `listener` (from `open_listener`, e.g. to
        learn an ephemeral port before workers start) is taken over and closed when the rendezvous ends,
        unless `keep_listener` (the caller goes on admitting on it: tpicore.comm.lobby).
        """
        lst = listener if listener is not None else open_listener(host, port)
        try:
            return _master(cls, world_size, lst, secret=_as_secret(secret), fingerprint=fingerprint,
                           timeout_s=timeout_s, mesh=mesh, max_nbytes=max_nbytes, encrypt=encrypt,
                           handshake_timeout_s=handshake_timeout_s)
        finally:
            if not (keep_listener and listener is not None):
                lst.close()

    @classmethod
    def worker(cls, rank: int, master_addr: str | tuple[str, int], *, world_size: int,
               secret: bytes | str | None = None, fingerprint: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
               max_nbytes: int = DEFAULT_MAX_NBYTES, encrypt: bool = True,
               handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Group:
        """Rank 1..N-1: join the master at `master_addr` ("host:port" or a tuple), retrying until `timeout_s`.

        Raises TpiError with the master's reason when refused (wrong secret, version, world size, rank,
        fingerprint). When the master asks for a mesh, listens on an ephemeral port of the interface that
        reaches the master, connects to every higher rank and admits every lower one.
        """
        return _worker(cls, rank, parse_addr(master_addr), world_size=world_size, secret=_as_secret(secret),
                       fingerprint=fingerprint, timeout_s=timeout_s, max_nbytes=max_nbytes, encrypt=encrypt,
                       handshake_timeout_s=handshake_timeout_s)


def _as_secret(secret: bytes | str | None) -> bytes | None:
    if secret is None or secret == b"" or secret == "":
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _terms(world_size: int, fingerprint: str, secret: bytes | None, encrypt: bool, host: str, what: str) -> Terms:
    """The link terms; refuses an unauthenticated or unencrypted group off loopback."""
    if not is_loopback(host):
        if secret is None:
            raise TpiError(f"{what} {host} is not a loopback address: a shared secret is required "
                           f"(peers must authenticate)")
        if not encrypt:
            raise TpiError(f"{what} {host} is not a loopback address: frames must be encrypted")
    return Terms(world_size, fingerprint, sealed=encrypt and secret is not None)


def _master(cls: type[Group], world_size: int, lst: socket.socket, *, secret: bytes | None, fingerprint: str,
            timeout_s: float, mesh: bool, max_nbytes: int, encrypt: bool, handshake_timeout_s: float) -> Group:
    if world_size < 1:
        raise TpiError(f"world_size must be >= 1, got {world_size}")
    host, port = lst.getsockname()[:2]
    terms = _terms(world_size, fingerprint, secret, encrypt, host, "rank 0 listens on")
    deadline = time.monotonic() + timeout_s
    channels: dict[int, Channel] = {}
    try:
        if world_size > 1:
            log.info("master listening on %s:%d for %d workers", host, port, world_size - 1)
        doors = Admissions(lst, my_rank=0, expected=set(range(1, world_size)), terms=terms, secret=secret,
                           refusals=RefusalLog("master"), handshake_timeout_s=min(handshake_timeout_s, timeout_s))
        joined = doors.run(deadline, lambda missing: f"timed out after {timeout_s:.1f} s waiting for workers; "
                                                     f"missing rank(s) {', '.join(map(str, missing))}")
        for rank, j in joined.items():
            channels[rank] = Channel(j.sock, rank=0, peer_rank=rank, timeout_s=timeout_s, max_nbytes=max_nbytes,
                                     cipher=j.admitted.cipher)
        peers = {str(rank): list(j.admitted.listen) if j.admitted.listen else None
                 for rank, j in joined.items()} if mesh else {}
        for ch in channels.values():
            ch.send_json(Kind.CONTROL, {"mesh": mesh, "peers": peers})
        for rank, ch in channels.items():  # a worker that failed to wire the mesh answers with ERROR
            if not ch.recv_json(Kind.CONTROL).get("ready"):
                raise ProtocolError(f"rank {rank} sent an unexpected control message instead of 'ready'")
        log.info("group of %d ready (mesh=%s, sealed=%s)", world_size, mesh, terms.sealed)
        return cls(0, world_size, channels, timeout_s=timeout_s, mesh=mesh)
    except BaseException:
        for ch in channels.values():
            ch.close(bye=False)
        raise


def _worker(cls: type[Group], rank: int, addr: tuple[str, int], *, world_size: int, secret: bytes | None,
            fingerprint: str, timeout_s: float, max_nbytes: int, encrypt: bool, handshake_timeout_s: float) -> Group:
    if not 1 <= rank < world_size:
        raise TpiError(f"worker rank must be in 1..{world_size - 1} for world_size {world_size}, got {rank}")
    terms = _terms(world_size, fingerprint, secret, encrypt, addr[0], "the master at")
    deadline = time.monotonic() + timeout_s
    channels: dict[int, Channel] = {}
    mesh_lst: list[socket.socket] = []  # opened once the interface that reaches the master is known

    def listen_on(sock: socket.socket) -> tuple[str, int]:
        if not mesh_lst:
            mesh_lst.append(open_listener(sock.getsockname()[0], 0))
        return mesh_lst[0].getsockname()[:2]

    try:
        sock, cipher = _join(addr, deadline, rank=rank, terms=terms, secret=secret, expect_rank=0,
                             listen_on=listen_on, handshake_timeout_s=handshake_timeout_s)
        master = channels[0] = Channel(sock, rank=rank, peer_rank=0, timeout_s=timeout_s, max_nbytes=max_nbytes,
                                       cipher=cipher)
        info = master.recv_json(Kind.CONTROL)  # sent once every rank has joined
        mesh = bool(info.get("mesh"))
        if mesh:
            try:
                wire_mesh(rank, world_size, info.get("peers"), mesh_lst[0], channels, terms=terms, secret=secret,
                          timeout_s=timeout_s, max_nbytes=max_nbytes, handshake_timeout_s=handshake_timeout_s)
            except TpiError as e:
                master.send_error(f"rank {rank} could not join the mesh: {e}")
                raise
        master.send_json(Kind.CONTROL, {"ready": True})
        return cls(rank, world_size, channels, timeout_s=timeout_s, mesh=mesh)
    except BaseException:
        for ch in channels.values():
            ch.close(bye=False)
        raise
    finally:
        for lst in mesh_lst:
            lst.close()


def join_master(addr: tuple[str, int], deadline: float, *, rank: int, terms: Terms, secret: bytes | None,
                timeout_s: float, max_nbytes: int = DEFAULT_MAX_NBYTES,
                handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Channel:
    """One channel to the master at `addr` as `rank` under `terms` (no mesh, no group messages): the
    lobby's join (lobby.py)."""
    sock, cipher = _join(addr, deadline, rank=rank, terms=terms, secret=secret, expect_rank=0, listen_on=None,
                         handshake_timeout_s=handshake_timeout_s)
    return Channel(sock, rank=rank, peer_rank=0, timeout_s=timeout_s, max_nbytes=max_nbytes, cipher=cipher)


def _join(addr: tuple[str, int], deadline: float, *, rank: int, terms: Terms, secret: bytes | None,
          expect_rank: int, listen_on: Callable[[socket.socket], tuple[str, int]] | None,
          handshake_timeout_s: float) -> tuple[socket.socket, FrameCipher | None]:
    """Connect and handshake; a connection dropped before the acceptor's verdict is retried until `deadline`
    (a busy acceptor evicts its oldest pending handshake). A refusal is final."""
    peer = f"rank {expect_rank}"
    delay = 0.05
    while True:
        sock = connect(addr, deadline, "master" if expect_rank == 0 else peer)
        try:
            sock.settimeout(max(min(handshake_timeout_s, deadline - time.monotonic()), 0.01))
            listen = listen_on(sock) if listen_on is not None else None
            return sock, join_peer(sock, rank=rank, terms=terms, secret=secret, expect_rank=expect_rank,
                                   listen=listen)
        except (PeerLost, PeerTimeout) as e:
            sock.close()
            if time.monotonic() + delay >= deadline:
                raise TpiError(f"rank {rank} could not complete the handshake with {peer} at "
                               f"{addr[0]}:{addr[1]}: {e}") from None
            log.info("rank %d: handshake with %s dropped (%s); retrying", rank, peer, e)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except BaseException:
            sock.close()
            raise


def wire_mesh(rank: int, world_size: int, peers: object, lst: socket.socket, channels: dict[int, Channel], *,
              terms: Terms, secret: bytes | None, timeout_s: float, max_nbytes: int = DEFAULT_MAX_NBYTES,
              handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Connect to every higher worker rank, admit every lower one (rank N-1 only admits, so no cycle)."""
    if not isinstance(peers, dict):
        raise ProtocolError(f"master sent peers {peers!r}, expected an object")
    deadline = time.monotonic() + timeout_s
    for peer in range(rank + 1, world_size):
        addr = peers.get(str(peer))
        if not (isinstance(addr, list) and len(addr) == 2 and isinstance(addr[0], str) and type(addr[1]) is int):
            raise ProtocolError(f"master sent no usable address for rank {peer}: {addr!r}")
        sock, cipher = _join((addr[0], addr[1]), deadline, rank=rank, terms=terms, secret=secret, expect_rank=peer,
                             listen_on=None, handshake_timeout_s=handshake_timeout_s)
        channels[peer] = Channel(sock, rank=rank, peer_rank=peer, timeout_s=timeout_s, max_nbytes=max_nbytes,
                                 cipher=cipher)
    if rank == 1:
        return
    doors = Admissions(lst, my_rank=rank, expected=set(range(1, rank)), terms=terms, secret=secret,
                       refusals=RefusalLog(f"rank {rank} (mesh)"),
                       handshake_timeout_s=min(handshake_timeout_s, timeout_s))
    joined = doors.run(deadline, lambda missing: f"timed out after {timeout_s:.1f} s waiting for rank(s) "
                                                 f"{', '.join(map(str, missing))} to connect to rank {rank}")
    for peer_rank, j in joined.items():
        channels[peer_rank] = Channel(j.sock, rank=rank, peer_rank=peer_rank, timeout_s=timeout_s,
                                      max_nbytes=max_nbytes, cipher=j.admitted.cipher)
