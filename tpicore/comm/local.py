"""Whole groups on this host, for tests and benchmarks: threads in one process, or one forked process per rank.

Owns `local_groups` and `run_local_processes`; both build real groups over TCP loopback through
group.py (no shortcut around the handshake or the encryption). By default every such group gets a fresh
random secret, so its frames are sealed like a deployment's; pass `encrypt=False` to measure without.
Not used by the inference path itself.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from typing import Any, Callable

import multiprocess as mp
from multiprocess.connection import wait

from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.endpoint import open_listener
from tpicore.comm.group import Group
from tpicore.errors import TpiError

RANDOM = "random"  # secret=RANDOM: a fresh 32-byte secret for this group


def _secret(secret: bytes | str | None) -> bytes | str | None:
    return secrets.token_bytes(32) if secret == RANDOM else secret


def local_groups(world_size: int, *, mesh: bool = True, secret: bytes | str | None = RANDOM,
                 fingerprint: str = "local", timeout_s: float = DEFAULT_TIMEOUT_S, encrypt: bool = True) -> list[Group]:
    """All ranks of a group in this process (one thread per worker during setup), over TCP loopback.

    Returns the groups indexed by rank; close each (or use them as context managers).
    """
    secret = _secret(secret)
    lst = open_listener("127.0.0.1", 0)
    addr = lst.getsockname()[:2]
    groups: list[Group | None] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def join(rank: int) -> None:
        try:
            groups[rank] = Group.worker(rank, addr, world_size=world_size, secret=secret, fingerprint=fingerprint,
                                        timeout_s=timeout_s, encrypt=encrypt)
        except BaseException as e:  # reported below, from the calling thread
            errors.append((rank, e))

    threads = [threading.Thread(target=join, args=(r,), daemon=True, name=f"tpi-join-{r}")
               for r in range(1, world_size)]
    for t in threads:
        t.start()
    try:
        groups[0] = Group.master(world_size, secret=secret, fingerprint=fingerprint, timeout_s=timeout_s, mesh=mesh,
                                 listener=lst, encrypt=encrypt)
    except BaseException as e:
        errors.insert(0, (0, e))
    for t in threads:
        t.join(timeout_s)
    if errors or any(g is None for g in groups):
        for g in groups:
            if g is not None:
                g.close()
        if errors:
            raise errors[0][1]
        raise TpiError(f"local group of {world_size} did not come up within {timeout_s:.1f} s")
    return groups  # type: ignore[return-value]


def run_local_processes(world_size: int, fn: Callable[[Group], Any], *, mesh: bool = True,
                        secret: bytes | str | None = RANDOM, fingerprint: str = "local",
                        timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float | None = None,
                        return_errors: bool = False, encrypt: bool = True) -> list[Any]:
    """Fork one process per rank, build the group over TCP loopback, return `fn(group)` per rank.

    Results come back through a pipe per child (local IPC, not the wire). A rank that raises or dies
    yields its exception (`return_errors=True`) or re-raises the first failure. Children still running
    after `wait_s` (default 2 x timeout_s + 10) are killed.
    """
    secret = _secret(secret)
    ctx = mp.get_context("fork")
    lst = open_listener("127.0.0.1", 0)
    addr = lst.getsockname()[:2]
    procs, readers = [], []
    try:
        for rank in range(world_size):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, args=(rank, world_size, addr, lst, fn, w, mesh, secret,
                                                      fingerprint, timeout_s, encrypt),
                            daemon=True, name=f"tpi-rank-{rank}")
            p.start()
            w.close()
            procs.append(p)
            readers.append(r)
    finally:
        lst.close()  # rank 0 holds its own copy
    wait_s = wait_s if wait_s is not None else 2 * timeout_s + 10.0
    results, pending = collect_results(readers, time.monotonic() + wait_s)
    out: list[Any] = []
    for rank, p in enumerate(procs):
        p.join(0.5 if rank not in pending else 0.0)
        if p.is_alive():
            p.kill()
            p.join()
        status, value = results.get(rank, ("late", None))
        if status == "ok":
            out.append(value)
        elif status == "err":
            out.append(value if isinstance(value, BaseException) else TpiError(str(value)))
        elif status == "died":
            out.append(TpiError(f"rank {rank} exited with code {p.exitcode} without a result"))
        else:
            out.append(TpiError(f"rank {rank} gave no result within {wait_s:.1f} s (killed)"))
    if not return_errors:
        for value in out:
            if isinstance(value, BaseException):
                raise value
    return out


def collect_results(readers: list, deadline: float) -> tuple[dict[int, tuple[str, Any]], set[int]]:
    """Each rank's (status, value) from its result pipe until `deadline` (monotonic s); a rank whose pipe
    closed without a result is ("died", None). Returns the results and the ranks still pending; every pipe
    is closed."""
    results: dict[int, tuple[str, Any]] = {}
    pending = dict(enumerate(readers))
    while pending and time.monotonic() < deadline:
        for r in wait(list(pending.values()), timeout=max(deadline - time.monotonic(), 0.0)):
            rank = next(k for k, v in pending.items() if v is r)
            try:
                results[rank] = r.recv()
            except (EOFError, OSError):
                results[rank] = ("died", None)
            r.close()
            del pending[rank]
    for r in pending.values():
        r.close()
    return results, set(pending)


def _child_main(rank: int, world_size: int, addr: tuple[str, int], lst: socket.socket, fn: Callable[[Group], Any],
                conn: Any, mesh: bool, secret: bytes | str | None, fingerprint: str, timeout_s: float,
                encrypt: bool) -> None:
    try:
        if rank == 0:
            group = Group.master(world_size, secret=secret, fingerprint=fingerprint, timeout_s=timeout_s,
                                 mesh=mesh, listener=lst, encrypt=encrypt)
        else:
            lst.close()
            group = Group.worker(rank, addr, world_size=world_size, secret=secret, fingerprint=fingerprint,
                                 timeout_s=timeout_s, encrypt=encrypt)
        with group:
            result = fn(group)
        conn.send(("ok", result))
    except BaseException as e:
        try:
            conn.send(("err", e))
        except Exception:
            conn.send(("err", TpiError(f"rank {rank}: {type(e).__name__}: {e}")))
    finally:
        conn.close()
