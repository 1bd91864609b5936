"""A group of forked device processes on an emulated network, for tests and benchmarks of the backends.

Owns `run_on_network`: one forked process per rank, each entering its place on the network (its
namespace with the kernel backend), joining a real group (tpicore.comm.group: handshake, sealed frames
off loopback) and running `fn(group, hook)` with the network's link hook installed. Results come back
through a pipe per child (local IPC). The launcher does the same for whole runs; this is the bare
version for measuring links. Must not import the launcher.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import multiprocess as mp

from emulator.net.clock import WallClock
from emulator.net.network import Network
from tpicore.comm.group import Group
from tpicore.comm.local import collect_results
from tpicore.errors import TpiError


def run_on_network(network: Network, world_size: int, fn: Callable[[Group, Any], Any], *, mesh: bool = False,
                   timeout_s: float = 60.0, clock_factory: Callable[[int], Any] | None = None,
                   seed: int = 0) -> list[Any]:
    """`fn(group, hook)` on every rank, each in its own forked process; returns the results by rank.
    clock_factory(rank): the device's clock (default: a WallClock with no spinning)."""
    secret = secrets.token_bytes(32)
    lst, addr = network.master_listener()
    ctx = mp.get_context("fork")
    procs, readers = [], []
    try:
        for rank in range(world_size):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(network, rank, world_size, lst, addr, secret, fn, w, mesh, timeout_s,
                                                 clock_factory, seed), daemon=True, name=f"net-rank-{rank}")
            p.start()
            w.close()
            procs.append(p)
            readers.append(r)
    finally:
        lst.close()
    results, _ = collect_results(readers, time.monotonic() + 2 * timeout_s + 10)
    results = {k: ("err", f"rank {k} died") if st == "died" else (st, v) for k, (st, v) in results.items()}
    for p in procs:
        p.join(0.5)
        if p.is_alive():
            p.kill()
            p.join()
    out = []
    for rank in range(world_size):
        status, value = results.get(rank, ("err", f"rank {rank} gave no result"))
        if status != "ok":
            raise TpiError(f"rank {rank}: {value}")
        out.append(value)
    return out


def _child(network: Network, rank: int, world_size: int, lst, addr: str, secret: bytes, fn, conn, mesh: bool,
           timeout_s: float, clock_factory, seed: int) -> None:
    try:
        if rank:
            lst.close()
        network.enter(rank)
        clock = clock_factory(rank) if clock_factory else WallClock(spin_s=0.0)
        if rank == 0:
            group = Group.master(world_size, secret=secret, timeout_s=timeout_s, mesh=mesh, listener=lst)
        else:
            group = Group.worker(rank, addr, world_size=world_size, secret=secret, timeout_s=timeout_s)
        with group:
            hook = network.hook(rank, clock, seed)
            group.link_hook = hook
            result = fn(group, hook)
            group.link_hook = None
            hook.close()
        conn.send(("ok", result))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("err", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
