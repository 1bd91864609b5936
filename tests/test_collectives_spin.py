"""Receives that poll before blocking (channel.Spin): the budget by cores, the backoff, EOF, exact sums."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from tpicore.comm.channel import (
    SPIN_BACKOFF_MAX,
    SPIN_S,
    PeerLost,
    Spin,
    spin_budget_s,
    spin_recv,
    usable_cores,
)
from tpicore.comm.collectives import ALGOS, Collective, allreduce, set_spin
from tpicore.comm.local import run_local_processes


def test_no_spin_with_more_processes_than_cores():
    cores = usable_cores()
    assert spin_budget_s(1) == SPIN_S and spin_budget_s(cores) == SPIN_S
    assert spin_budget_s(cores + 1) == 0.0


def test_failed_spins_back_off_and_a_caught_frame_resets():
    a, b = socket.socketpair()
    try:
        view = memoryview(bytearray(8))
        spin = Spin(20e-6, check_load=False)
        skipped = 0
        for expected_backoff in (1, 2, 4):
            assert spin.poll(a, view, "peer") == 0  # nothing sent: the spin runs out
            assert spin.backoff == expected_backoff and spin.skip == expected_backoff
            while spin.skip:
                assert spin.poll(a, view, "peer") == 0
                skipped += 1
        assert skipped == 1 + 2 + 4
        b.sendall(b"12345678")
        assert spin.poll(a, view, "peer") == 8 and bytes(view) == b"12345678"
        assert spin.backoff == 0 and spin.skip == 0
        spin.backoff = SPIN_BACKOFF_MAX
        assert spin.poll(a, view, "peer") == 0 and spin.backoff == SPIN_BACKOFF_MAX  # capped
    finally:
        a.close()
        b.close()


def test_a_busy_host_blocks_at_once(monkeypatch):
    a, b = socket.socketpair()
    try:
        b.sendall(b"1234")
        monkeypatch.setattr(os, "getloadavg", lambda: (usable_cores() + 1.0, 0.0, 0.0))
        spin = Spin(SPIN_S)
        assert spin.poll(a, memoryview(bytearray(4)), "peer") == 0 and spin.busy  # data waits: no poll
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        spin = Spin(SPIN_S)
        assert spin.poll(a, memoryview(bytearray(4)), "peer") == 4 and not spin.busy
    finally:
        a.close()
        b.close()


def test_spin_sees_the_peer_close():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(PeerLost, match="closed"):
        spin_recv(a, memoryview(bytearray(4)), SPIN_S, "rank 1")
    a.close()


def _sums(group, spin_s: float) -> dict:
    set_spin(group, spin_s)
    out = {}
    for algo in ALGOS:
        x = np.arange(7, dtype=np.float32) * np.float32(group.rank + 1) + np.float32(0.1)
        for _ in range(20):  # back to back: frames arrive while the receiver spins, or after it blocked
            y = allreduce(group, x.copy(), algo)
        out[algo] = y
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_spinning_receives_give_the_blocking_sums(n):
    """Forced on (even with more ranks than cores) and off: the same bits on every rank."""
    spun = run_local_processes(n, lambda g: _sums(g, 50e-6), mesh=True, timeout_s=20.0, wait_s=120.0)
    blocked = run_local_processes(n, lambda g: _sums(g, 0.0), mesh=True, timeout_s=20.0, wait_s=120.0)
    for algo in ALGOS:
        for r in range(n):
            assert np.array_equal(spun[r][algo], blocked[0][algo])


def test_collective_sets_the_budget_on_every_channel():
    seen = run_local_processes(2, lambda g: (Collective(g, "star"), [ch.spin.spin_s for ch in g.channels.values()])[1],
                               timeout_s=20.0, wait_s=60.0)
    assert seen == [[spin_budget_s(2)], [spin_budget_s(2)]]
