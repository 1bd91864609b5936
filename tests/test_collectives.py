"""Allreduce and broadcast over real TCP loopback: exact sums, determinism, dead and stalled peers, no leaks."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from tpicore.comm.channel import PeerLost, PeerTimeout
from tpicore.comm.collectives import ALGOS, Collective, allreduce, broadcast
from tpicore.comm.endpoint import open_listener
from tpicore.comm.frame import wire_nbytes
from tpicore.comm.group import Group
from tpicore.comm.local import local_groups, run_local_processes
from tpicore.errors import TpiError

SIZES = [1, 7, 16384]  # floats: 4 B, odd (7 floats over 8 ranks leaves an empty ring chunk), 64 KiB


def _inputs(rank: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(1000 + rank)
    return {n: rng.standard_normal(n).astype(np.float32) for n in SIZES}


def _fixed_order_sum(world_size: int, n: int) -> np.ndarray:
    acc = _inputs(0)[n].copy()
    for r in range(1, world_size):
        acc += _inputs(r)[n]  # the star's order: ((x0 + x1) + x2) + ...
    return acc


def _every_algo_twice(group: Group) -> dict:
    out = {}
    for algo in ALGOS:
        reduce = Collective(group, algo)
        for n, x in _inputs(group.rank).items():
            first = reduce(x.copy())
            second = reduce(x.copy())
            out[(algo, n)] = (first, second)
    root_data = np.arange(12, dtype=np.float32).reshape(3, 4) if group.rank == 0 else None
    out["bcast"] = broadcast(group, root_data)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_allreduce_matches_fixed_order_sum_across_processes(world_size):
    results = run_local_processes(world_size, _every_algo_twice, timeout_s=20.0)
    for n in SIZES:
        want = _fixed_order_sum(world_size, n)
        exact = np.sum([_inputs(r)[n].astype(np.float64) for r in range(world_size)], axis=0)
        for algo in ALGOS:
            first0 = results[0][(algo, n)][0]
            np.testing.assert_allclose(first0, exact, rtol=1e-6, atol=1e-6, err_msg=f"{algo} n={n}")
            if algo == "star":
                assert first0.tobytes() == want.tobytes(), "star must add in rank order"
            for r in range(world_size):
                first, second = results[r][(algo, n)]
                assert first.tobytes() == second.tobytes(), f"{algo} rank {r}: repeated call differs"
                assert first.tobytes() == first0.tobytes(), f"{algo}: rank {r} disagrees with rank 0"
    for r in range(world_size):
        np.testing.assert_array_equal(results[r]["bcast"], np.arange(12, dtype=np.float32).reshape(3, 4))


def test_large_ring_payload_does_not_deadlock():
    """4 MiB per rank: every ring step sends more than the socket buffers hold while receiving as much."""
    def run(group: Group) -> int:
        x = np.full(1 << 20, group.rank + 1, np.float32)
        return int(np.count_nonzero(allreduce(group, x, "ring") != 6.0))

    assert run_local_processes(3, run, timeout_s=20.0) == [0, 0, 0]


def _in_threads(groups: list[Group], fn) -> list:
    out: list = [None] * len(groups)

    def run(g: Group) -> None:
        try:
            out[g.rank] = fn(g)
        except Exception as e:
            out[g.rank] = e

    threads = [threading.Thread(target=run, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_threads_mesh_secret_and_preallocated_buffers():
    groups = local_groups(4, secret=b"k", fingerprint="m")

    def run(g: Group):
        x = np.full((2, 5), g.rank, np.float32)
        result = allreduce(g, x, "tree")
        assert result is x  # reduced in place
        scratch = g.scratch(0)
        allreduce(g, np.ones(7, np.float32), "star")  # smaller: the receive buffer is reused, not regrown
        return x.copy(), g.scratch(0) is scratch

    for x, reused in _in_threads(groups, run):
        np.testing.assert_array_equal(x, np.full((2, 5), 6.0, np.float32))
        assert reused
    for g in groups:
        g.close()


def test_link_hook_stamps_and_sees_every_frame():
    class Hook:
        def __init__(self):
            self.sent, self.recvd = [], []
            self.lock = threading.Lock()

        def now(self) -> float:
            return 1.5

        def on_send(self, src: int, dst: int, nbytes: int) -> float:
            with self.lock:
                self.sent.append((src, dst, nbytes))
            return 100.0 + src

        def on_wait(self, src: int, dst: int) -> None:
            pass

        def on_recv(self, src, dst, nbytes, t_send, t_deliver) -> None:
            with self.lock:
                self.recvd.append((src, dst, nbytes, t_send, t_deliver))

    groups = local_groups(3)  # sealed (a fresh random secret): the hook sees the sealed frame's size
    hook = Hook()
    for g in groups:
        g.link_hook = hook
    _in_threads(groups, lambda g: allreduce(g, np.ones(10, np.float32), "star"))
    for g in groups:
        g.close()
    frame = wire_nbytes(40, sealed=True)
    assert sorted(hook.sent) == [(0, 1, frame), (0, 2, frame), (1, 0, frame), (2, 0, frame)]
    assert sorted(hook.recvd) == sorted((s, d, n, 1.5, 100.0 + s) for s, d, n in hook.sent)


def test_bad_arguments_are_user_errors():
    groups = local_groups(3, mesh=False)
    try:
        with pytest.raises(TpiError, match="unknown allreduce algorithm 'nccl'"):
            Collective(groups[0], "nccl")
        with pytest.raises(TpiError, match="needs worker-to-worker links"):
            Collective(groups[0], "ring")
        with pytest.raises(TpiError, match="takes float32 arrays, got float64"):
            allreduce(groups[0], np.ones(3), "star")
    finally:
        for g in groups:
            g.close()
    assert allreduce(Group(0, 1, {}), np.ones(3, np.float32)).tolist() == [1, 1, 1]


@pytest.mark.parametrize("algo", ALGOS)
def test_killed_peer_is_named_within_the_timeout(algo):
    """A killed rank's sockets close at once: every survivor learns it from EOF (PeerLost, its own or
    forwarded), never by waiting out the timeout (which would surface as PeerTimeout)."""
    def run(group: Group):
        if group.rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            for _ in range(3):
                allreduce(group, np.ones(1000, np.float32), algo)
        except (PeerLost, PeerTimeout) as e:
            return type(e).__name__, str(e)
        return "no error", ""

    results = run_local_processes(4, run, timeout_s=30.0, return_errors=True)
    assert isinstance(results[2], TpiError) and "exited with code -9" in str(results[2])
    for rank in (0, 1, 3):
        kind, msg = results[rank]
        assert kind in ("PeerLost", "PeerTimeout"), (rank, kind, msg)
        assert "rank 2" in msg, (rank, msg)
        assert kind == "PeerLost", (rank, kind, msg)  # detected by EOF, not by the 30 s timeout


def test_stalled_peer_times_out_naming_it():
    def run(group: Group):
        if group.rank == 2:
            time.sleep(1.6)
        try:
            allreduce(group, np.ones(4, np.float32), "star")
        except (PeerLost, PeerTimeout) as e:
            return type(e).__name__, str(e)
        return "no error", ""

    results = run_local_processes(3, run, timeout_s=0.5, return_errors=True)
    assert results[0] == ("PeerTimeout", "rank 2 sent nothing for 0.5 s")
    # rank 1 has waited on rank 0 about as long as rank 0 on rank 2: whichever timer fires first names its link
    assert results[1] in {("PeerTimeout", "rank 2 sent nothing for 0.5 s (reported by rank 0)"),
                          ("PeerTimeout", "rank 0 sent nothing for 0.5 s")}
    assert results[2][0] in ("PeerLost", "PeerTimeout")  # woke up to a group that had already given up


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_every_socket():
    before = _open_fds()
    lst = open_listener()
    port = lst.getsockname()[1]
    workers: dict = {}
    threads = [threading.Thread(target=lambda r=r: workers.__setitem__(
        r, Group.worker(r, ("127.0.0.1", port), world_size=4, timeout_s=10))) for r in (1, 2, 3)]
    for t in threads:
        t.start()
    master = Group.master(4, listener=lst, timeout_s=10)
    for t in threads:
        t.join(10)
    groups = [master] + [workers[r] for r in (1, 2, 3)]
    _in_threads(groups, lambda g: allreduce(g, np.ones(3, np.float32), "ring"))
    for g in groups:
        g.close()
        g.close()  # idempotent
    assert _open_fds() == before
    again = open_listener("127.0.0.1", port)  # nothing is listening on the master's port any more
    again.close()
    with pytest.raises(TpiError, match="closed"):
        allreduce(master, np.ones(3, np.float32))


@pytest.mark.timeout(30)  # the property is "gives up instead of waiting forever"; no wall-clock assertion
def test_worker_gives_up_when_no_master_listens():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(TpiError, match=f"could not reach master at 127.0.0.1:{port}"):
        Group.worker(1, f"127.0.0.1:{port}", world_size=2, timeout_s=0.3)
