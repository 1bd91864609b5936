"""Causal, deterministic virtual time (emulator/net/causal.py): links booked in virtual-time order, no cap
on queued messages. Exact checks against the link model (links.py); nothing here measures wall time."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from emulator.config.run_config import load_run_config
from emulator.config.topology import Link, Machine, make_topology
from emulator.net.clock import VirtualClock
from emulator.net.links import BURST_BYTES, PACKET_BYTES
from emulator.net.schedule import LinkSchedule
from emulator.net.scripted import Advance, AdvanceTo, Pause, Recv, Send, run_script
from emulator.net.shaper import LinkShaper
from emulator.run.launcher import Run
from tpicore.comm.collectives import allreduce
from tpicore.comm.group import Group
from tpicore.comm.local import run_local_processes
from tpicore.errors import TpiError

MiB = 2**20


def devices(n: int) -> list[Machine]:
    return [Machine(f"d{i}", cores=1, mem_bytes=2**30) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Causality: the audit's example. Star, 1 ms links at 300 Mbit/s; A (rank 1) sends 1 MiB at virtual
# 10 ms and reaches the shaper first in host time; B (rank 2) sends 1 MiB at virtual 5 ms, later in host
# time. B owns the master's downlink from 5 ms on: delivered at 5 + S/B + 2 L + p/B = 35.0 ms, and A
# queues behind it. Booking in host order delivered B at 67.96 ms.

B300, L1 = 300e6 / 8, 0.001
FRAME = MiB + 56  # the audit's frame: 1 MiB payload + a 56-byte header


def audit_script(a_first: bool) -> dict:
    first, second = [Pause(0.0)], [Pause(0.05)]  # host order only; virtual time does not move
    return {1: (first if a_first else second) + [AdvanceTo(0.010), Send(0, FRAME)],
            2: (second if a_first else first) + [AdvanceTo(0.005), Send(0, FRAME)],
            0: [Recv(1), Recv(2)]}


@pytest.mark.parametrize("a_first", [True, False])
def test_causality_the_earlier_message_owns_the_link_whatever_the_host_order(a_first):
    topo = make_topology(devices(3), "star", Link(latency_ms=1, bandwidth_mbps=300))
    tr = run_script(topo, audit_script(a_first), burst_bytes=0)
    a, b = tr.deliveries[0]
    s, p = FRAME / B300, PACKET_BYTES / B300
    assert b == pytest.approx(0.005 + s + 2 * L1 + p, abs=1e-12)
    assert b * 1e3 == pytest.approx(35.0, abs=0.01)
    assert a == pytest.approx(0.005 + 2 * s + 2 * L1 + p, abs=1e-12)  # B's transmission, then A's
    assert tr.counters == {"in_flight": 0, "violations": 0, "forced": 0}


def test_causality_with_the_token_bucket_shifts_both_by_the_burst():
    """With the default bucket (2 packets): the uplink sends the first BURST_BYTES at once and the rest at
    the rate; the downlink's bucket passes the stream as it comes (same rate), so the last byte is
    BURST_BYTES/B earlier than on a serialising link, and the first packet's store-and-forward (p/B) is
    gone (the bucket holds more than a packet). Same order: B first."""
    topo = make_topology(devices(3), "star", Link(latency_ms=1, bandwidth_mbps=300))
    a, b = run_script(topo, audit_script(True)).deliveries[0]
    s, burst = FRAME / B300, BURST_BYTES / B300
    assert b == pytest.approx(0.005 + s + 2 * L1 - burst, abs=1e-12)
    assert a == pytest.approx(0.005 + 2 * s + 2 * L1 - burst, abs=1e-12)


def test_an_idle_link_charges_only_the_bytes_beyond_the_bucket():
    B, L = 100e6 / 8, 0.002
    topo = make_topology(devices(2), "full", Link(latency_ms=2, bandwidth_mbps=100))
    small, big = run_script(topo, {0: [Send(1, 1000), AdvanceTo(1.0), Send(1, MiB)], 1: [Recv(0), Recv(0)]}).deliveries[1]
    assert small == pytest.approx(L, abs=1e-12)  # fits the bucket: no serialisation at all
    assert big - 1.0 == pytest.approx((MiB - BURST_BYTES) / B + L, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Incast: N - 1 senders into the master's downlink. Only that link has a bandwidth (uplinks unlimited),
# so the analytic queue is exact: the k-th message is delivered at route latency + k * bytes / rate.

@pytest.mark.parametrize("n", [32, 64])
def test_incast_grows_linearly_with_n(n):
    B, L, S = 100e6 / 8, 0.001, 64 * 1024
    topo = make_topology(devices(n), "star", Link(latency_ms=1),
                         per_device={"d0": Link(latency_ms=1, bandwidth_mbps=100)})
    scripts = {r: [Send(0, S)] for r in range(1, n)} | {0: [Recv(r) for r in range(1, n)]}
    tr = run_script(topo, scripts, burst_bytes=0)
    got = tr.deliveries[0]
    assert got == pytest.approx([2 * L + k * S / B for k in range(1, n)], abs=1e-12)
    assert max(got) == pytest.approx(2 * L + (n - 1) * S / B, abs=1e-12)  # the old 16-slot schedule: -43% at 32
    assert tr.counters == {"in_flight": 0, "violations": 0, "forced": 0}


def test_incast_on_a_symmetric_star_pipelines_packets():
    """Every link limited: uplinks in parallel, then the downlink queue; the first packet pipelines."""
    n, B, L, S = 32, 100e6 / 8, 0.001, 64 * 1024
    topo = make_topology(devices(n), "star", Link(latency_ms=1, bandwidth_mbps=100))
    tr = run_script(topo, {r: [Send(0, S)] for r in range(1, n)} | {0: [Recv(r) for r in range(1, n)]},
                    burst_bytes=0)
    assert max(tr.deliveries[0]) == pytest.approx(2 * L + (n - 1) * S / B + PACKET_BYTES / B, abs=1e-12)


def test_many_messages_in_flight_grow_the_tables():
    """300 messages queued on one link before any is received: every one is kept and booked in order."""
    B, S = 10e6 / 8, 1000
    topo = make_topology(devices(2), "full", Link(bandwidth_mbps=10))
    tr = run_script(topo, {0: [Send(1, S)] * 300, 1: [Recv(0)] * 300}, burst_bytes=0)
    assert tr.deliveries[1] == pytest.approx([k * S / B for k in range(1, 301)], abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Determinism: identical compute-free runs give identical times whatever the host does.

def shuffled_allreduces(seed: int, n: int = 6, steps: int = 4) -> dict:
    """Star allreduces of 8 KiB with compute steps in between, every rank pausing a random host time
    before each action (a different host order in every run)."""
    rng = random.Random(seed)
    scripts: dict[int, list] = {r: [] for r in range(n)}
    for step in range(steps):
        for r in range(n):
            scripts[r] += [Pause(rng.uniform(0, 0.004)), Advance(0.001 * ((r * 7 + step) % 3))]
        for r in range(1, n):
            scripts[r].append(Send(0, 8192))
            scripts[0].append(Recv(r))
        for r in range(1, n):
            scripts[0].append(Send(r, 8192))
            scripts[r].append(Recv(0))
    return scripts


def test_identical_runs_give_identical_times_in_any_host_order():
    topo = make_topology(devices(6), "klonet", Link(latency_ms=1, bandwidth_mbps=50, jitter_ms=0.3))
    first = run_script(topo, shuffled_allreduces(1), seed=3)
    for host_seed in (2, 3):
        again = run_script(topo, shuffled_allreduces(host_seed), seed=3)
        assert again.deliveries == first.deliveries and again.ends == first.ends
    assert first.counters["violations"] == 0


def _allreduce_device(group: Group, perturb_seed: int, schedule: LinkSchedule, topo) -> list[float]:
    """Compute-free allreduces (every algorithm) on one rank; the clock after each one."""
    rng = random.Random(perturb_seed * 100 + group.rank)
    clock = VirtualClock(cpu_time=lambda: 0.0)
    group.link_hook = shaper = LinkShaper(topo, schedule, group.rank, clock, seed=5)
    out = []
    for algo in ("star", "ring", "tree", "star"):
        time.sleep(rng.uniform(0, 0.003))  # the host's order changes, virtual time does not
        x = np.full(3000, group.rank, np.float32)
        allreduce(group, x, algo)
        out.append(clock.now())
    shaper.close()
    return out


def test_identical_runs_over_the_transport_are_identical():
    """Real processes, real TCP, the transport's on_wait/on_recv: two runs, different host timing."""
    topo = make_topology(devices(5), "klonet", Link(latency_ms=2, bandwidth_mbps=100))
    runs = []
    for perturb in (1, 2):
        with LinkSchedule.create(len(topo.links)) as schedule:
            runs.append(run_local_processes(5, lambda g: _allreduce_device(g, perturb, schedule, topo), timeout_s=60))
    assert runs[0] == runs[1]
    assert all(t > 0 for t in runs[0][0])


# ---------------------------------------------------------------------------------------------------
# The scheme's edges.

def test_a_frame_not_registered_by_its_sender_is_refused():
    topo = make_topology(devices(2), "full", Link(latency_ms=1))
    with LinkSchedule.create(len(topo.links)) as schedule:
        shaper = LinkShaper(topo, schedule, 1, VirtualClock())
        with pytest.raises(TpiError, match="was not registered with the link schedule"):
            shaper.on_recv(0, 1, 100, 0.0, 0.0)
        shaper.close()


def test_a_rank_that_never_attached_holds_back_bookings_and_is_named_on_timeout():
    """Rank 2 of the star never creates its shaper: nobody knows what it will send into the master's
    downlink, so rank 1's message waits, and the timeout names rank 2."""
    topo = make_topology(devices(3), "star", Link(latency_ms=1, bandwidth_mbps=100))
    with pytest.raises(TpiError, match=r"not booked within 1 s.*rank 2: never attached"):
        run_script(topo, {1: [Advance(0.001), Send(0, 1000)], 0: [Recv(1)]}, timeout_s=1.0, others_idle=False)


def test_links_without_bandwidth_never_wait_for_others():
    """Latency-only links cannot queue: messages are booked at once, whatever other ranks do."""
    topo = make_topology(devices(3), "star", Link(latency_ms=1))
    tr = run_script(topo, {1: [Advance(0.5), Send(0, 10)], 0: [Recv(1)]}, timeout_s=5.0, others_idle=False)
    assert tr.deliveries[0] == [pytest.approx(0.502, abs=1e-12)]


def test_two_threads_of_one_device_are_refused():
    topo = make_topology(devices(2), "full", Link(latency_ms=1))
    with LinkSchedule.create(len(topo.links)) as schedule:
        shaper = LinkShaper(topo, schedule, 0, VirtualClock())
        shaper._user = -1  # another thread is inside the hook
        with pytest.raises(TpiError, match="two threads of one device"):
            shaper.on_send(0, 1, 10)
        shaper._user = None
        shaper.close()


# ---------------------------------------------------------------------------------------------------
# A whole emulation run (python -m emulator run), compute free: the same numbers every time.

def compute_free_run(tmp_path, cache, name: str) -> list:
    doc = {"name": name,
           "topology": {"devices": {"count": 4, "template": {"cores": 1, "mem_bytes": "8GiB"}},
                        "links": {"shape": "star", "latency_ms": 1, "bandwidth_mbps": 20, "jitter_ms": 0.2}},
           "model": {"synth": "tiny"},
           "workload": {"prompt_lengths": [6], "new_tokens": 4, "repetitions": 2},
           "options": {"clock": "virtual", "compute": "free", "allreduce": "star"}}
    out = Run(load_run_config(None, doc=doc), results_dir=tmp_path / "results", cache_dir=cache, progress=False).run()
    assert out.exit_code == 0 and out.records
    return [(r.timings.ttft_s, r.timings.token_latencies_s, r.links.forced, r.links.violations) for r in out.records]


def test_identical_compute_free_runs_give_identical_numbers(tmp_path):
    cache = tmp_path / "cache"
    first = compute_free_run(tmp_path, cache, "a")
    assert compute_free_run(tmp_path, cache, "b") == first
    assert all(ttft > 0 and violations == 0 for ttft, _, _, violations in first)
