"""The user-space shaper: wall-mode self-tests over real TCP loopback between processes (each prints
expected, measured and tolerance; run with -s to see them), and exact virtual-clock totals."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emulator.net.clock import VirtualClock, WallClock
from emulator.net.shaper import PACKET_BYTES, LinkSchedule, LinkShaper
from emulator.net.tc import NO_NETEM, TcNetwork, tc_available
from emulator.config.topology import Device, Link, Topology, load_topology, make_topology
from tpicore.comm.collectives import allreduce, broadcast
from tpicore.comm.transport import Group, run_local_processes
from tpicore.comm.wire import HEADER_NBYTES, Kind
from tpicore.errors import TpiError

MiB = 2**20
KLONET = load_topology(Path(__file__).resolve().parent.parent / "configs" / "topologies" / "klonet.yaml")


def devices(n: int) -> list[Device]:
    return [Device(f"d{i}", cores=1, mem_bytes=2**30) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Wall mode over the real transport: one forked process per rank, TCP loopback, the shaper as link hook.

def sync_start(group: Group, lead_s: float = 0.05) -> float:
    """A start time every rank agrees on (sent unshaped from rank 0): perf_counter is shared by all
    processes on the host, so ranks can act 'at the same moment'."""
    t = np.array([time.perf_counter() + lead_s]).view(np.int64) if group.rank == 0 else None  # wire has no f64
    return float(broadcast(group, t).view(np.float64)[0])


def run_wall(topology: Topology, plans: dict[int, list[tuple[float, int]]]) -> list[tuple[int, float, float]]:
    """Each rank in `plans` sends its (offset_s, payload bytes) messages to rank 0 (a frame is the
    payload + a 56-byte header); returns one (src, t_sent, t_seen) per message: just before the send
    call, and when rank 0's recv returned (the hook holds each frame until its deadline)."""
    schedule = LinkSchedule.create(len(topology.links))

    def device(group: Group):
        t0 = sync_start(group)
        group.link_hook = shaper = LinkShaper(topology, schedule, group.rank)
        if group.rank in plans:
            sent = []
            payload = np.zeros(max(n for _, n in plans[group.rank]), np.uint8)
            for offset, nbytes in plans[group.rank]:
                shaper.clock.wait_until(t0 + offset)
                sent.append(time.perf_counter())
                group.channel(0).send_array(Kind.TENSOR, payload[:nbytes])
            return sent
        seen: dict[int, list[float]] = {src: [] for src in plans}

        def receive(src: int) -> None:  # one thread per sender: deadlines are absolute, order is free
            for _ in plans[src]:
                group.channel(src).recv_array(Kind.TENSOR)
                seen[src].append(time.perf_counter())

        threads = [threading.Thread(target=receive, args=(src,)) for src in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return seen

    try:
        out = run_local_processes(len(topology), device, mesh=False, timeout_s=20)
    finally:
        schedule.close()
    return [(src, t_sent, t_seen) for src in plans for t_sent, t_seen in zip(out[src], out[0][src], strict=True)]


def report(what: str, expected_ms: float, measured_ms: float, tol: str) -> None:
    print(f"\n  {what:<44} expected {expected_ms:8.3f} ms  measured {measured_ms:8.3f} ms  tolerance {tol}")


# ---------------------------------------------------------------------------------------------------
# Wall mode

@pytest.mark.parametrize("latency_ms", [1, 5, 10])
def test_wall_one_way_latency(latency_ms):
    topo = make_topology(devices(2), "full", Link(latency_ms=latency_ms))
    gap = latency_ms / 1e3 + 0.004
    res = run_wall(topo, {1: [(i * gap, 64) for i in range(21)]})  # unlimited link: size costs nothing
    one_way = [t_seen - t_sent for _, t_sent, t_seen in res]
    err = statistics.median(one_way) * 1e3 - latency_ms
    report(f"one-way latency, 64 B, {latency_ms} ms link", latency_ms, statistics.median(one_way) * 1e3,
           "median error 0.3 ms")
    assert abs(err) <= 0.3


@pytest.mark.parametrize("mbps", [100, 300])
def test_wall_bandwidth(mbps):
    topo = make_topology(devices(2), "full", Link(bandwidth_mbps=mbps))
    expected = (MiB + HEADER_NBYTES) * 8 / (mbps * 1e6)
    res = run_wall(topo, {1: [(i * (expected + 0.015), MiB) for i in range(3)]})
    took = statistics.median(t_seen - t_sent for _, t_sent, t_seen in res)
    report(f"1 MiB at {mbps} Mbit/s ({MiB * 8 / took / 1e6:.1f} Mbit/s)", expected * 1e3, took * 1e3, "5%")
    assert took == pytest.approx(expected, rel=0.05)


def test_wall_two_senders_share_a_link():
    """Star: ranks 1 and 2 send 1 MiB to rank 0 at once; their uplinks are separate, rank 0's downlink
    is shared, so together they take twice as long as one: each gets half the bandwidth."""
    mbps = 100
    topo = make_topology(devices(3), "star", Link(latency_ms=0.5, bandwidth_mbps=mbps))
    res = run_wall(topo, {1: [(0.0, MiB)], 2: [(0.0, MiB)]})
    start = min(t_sent for _, t_sent, _ in res)
    last = max(t_seen for *_, t_seen in res) - start
    frame = MiB + HEADER_NBYTES
    alone = (frame + PACKET_BYTES) * 8 / (mbps * 1e6) + 2 * 0.0005
    expected = alone + frame * 8 / (mbps * 1e6)
    report("2 x 1 MiB into one 100 Mbit/s downlink", expected * 1e3, last * 1e3, "5%")
    print(f"  per-sender goodput {MiB * 8 / last / 1e6:.1f} Mbit/s (half the link: {mbps / 2})")
    assert last == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------------------------
# Allreduce over the emulated Klonet testbed (8 devices, 4 links between any two): the paper's Fig. 3
# model counts link traversals on the critical path, tau each.

TAU_MS = 2.0
# hops (device-to-device messages) on the critical path of each algorithm of tpicore.comm.collectives
# with N = 8: star up + down = 2; ring 2 (N-1) = 14; tree: depth 2 (0; 1,2,3; 4..7), up and down = 4,
# the paper's depth-2 tree (tpicore.comm.collectives.tree_children).
HOPS = {"star": 2, "tree": 4, "ring": 14}
PAPER_TAU = {"star": 8, "tree": 16, "ring": 56}


def klonet(tau_ms: float) -> Topology:
    return make_topology(KLONET.devices, "klonet", Link(latency_ms=tau_ms, bandwidth_mbps=300))


def test_allreduce_on_klonet_wall_clock():
    """Wall mode: never earlier than the modelled link time, and at most 10% later than it plus what
    the allreduce costs this host anyway. Eight processes on 2 cores wake one after another (~0.1-0.2
    ms each), adding 1-2 ms to every run whatever the links, so each algorithm is also timed over
    zero-latency links to measure that host cost. (Virtual mode, below, has no host cost.)"""
    reps = 5
    topos = {tau: klonet(tau) for tau in (0.0, TAU_MS)}
    schedules = {tau: LinkSchedule.create(len(t.links)) for tau, t in topos.items()}

    def device(group: Group):
        took = {}
        for tau, topo in topos.items():
            shaper = LinkShaper(topo, schedules[tau], group.rank)
            for algo in HOPS:
                runs = []
                for _ in range(1 + reps):  # the first run warms up code paths and is dropped
                    group.link_hook = None
                    t0 = sync_start(group, 0.02)
                    group.link_hook = shaper
                    shaper.clock.wait_until(t0)
                    out = allreduce(group, np.ones(1, np.float32), algo)  # a 4-byte payload
                    runs.append(time.perf_counter() - t0)
                    assert out[0] == 8.0
                took[tau, algo] = runs[1:]
        return took

    try:
        out = run_local_processes(len(topos[TAU_MS]), device, timeout_s=30)
    finally:
        for sch in schedules.values():
            sch.close()

    def best_end(tau: float, algo: str) -> float:
        """An allreduce ends when its last rank has the sum; host noise only ever adds, so the best
        of the runs is what the emulator does when the host lets it."""
        return min(max(rank[tau, algo][i] for rank in out) for i in range(reps))

    failures = []
    for algo, hops in HOPS.items():
        host = best_end(0.0, algo)
        measured = best_end(TAU_MS, algo)
        links = hops * 4 * TAU_MS / 1e3
        report(f"allreduce {algo}, 8 devices, tau {TAU_MS} ms (paper: {PAPER_TAU[algo]} tau)", links * 1e3,
               measured * 1e3, f"never early; at most 10% + host cost {host * 1e3:.2f} ms late")
        # deadlines are absolute: never early, whatever the host does
        assert measured >= links - 1e-4, f"{algo}: delivered early ({measured * 1e3:.2f} ms < {links * 1e3:.2f} ms)"
        if measured > 1.10 * links + host:
            failures.append(f"{algo}: {measured * 1e3:.2f} ms > {links * 1e3:.2f} ms + 10% + {host * 1e3:.2f} ms")
    if failures:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:  # others keep every core busy: 8 processes cannot wake on time in wall mode
            pytest.skip(f"host overloaded (load {load:.1f} on {cores} cores), wall timing not meaningful: "
                        f"{'; '.join(failures)} (the virtual-clock test checks the same model)")
        pytest.fail("; ".join(failures))


def test_allreduce_on_klonet_virtual_clock():
    topo = klonet(TAU_MS)
    schedules = {algo: LinkSchedule.create(len(topo.links)) for algo in HOPS}

    def device(group: Group):
        ends = {}
        for algo in HOPS:
            clock = VirtualClock()
            group.link_hook = LinkShaper(topo, schedules[algo], group.rank, clock)
            allreduce(group, np.ones(1, np.float32), algo)
            ends[algo] = clock.now()
        return ends

    wall0 = time.perf_counter()
    try:
        out = run_local_processes(len(topo), device, timeout_s=30)
    finally:
        for sch in schedules.values():
            sch.close()
    wall = time.perf_counter() - wall0
    for algo, hops in HOPS.items():
        measured = max(rank[algo] for rank in out)
        expected = hops * 4 * TAU_MS / 1e3
        report(f"virtual allreduce {algo} (paper {PAPER_TAU[algo]} tau)", expected * 1e3, measured * 1e3,
               "1% (queueing of 60-byte frames only)")
        assert measured == pytest.approx(expected, rel=0.01)
    print(f"  {sum(HOPS.values()) * 4 * TAU_MS:.0f} ms of emulated allreduces in {wall * 1e3:.0f} ms of wall time")


# ---------------------------------------------------------------------------------------------------
# Virtual mode: exact totals, nothing sleeps.

class Devices:
    """N in-process devices sharing one schedule, each with its own virtual clock."""

    def __init__(self, topology: Topology, speeds=None, **kw):
        self.schedule = LinkSchedule.create(len(topology.links))
        self.clocks = [VirtualClock(speed=(speeds or {}).get(r, 1.0)) for r in range(len(topology))]
        self.shapers = [LinkShaper(topology, self.schedule, r, self.clocks[r], **kw) for r in range(len(topology))]

    def send(self, src: int, dst: int, nbytes: int) -> float:
        """src sends now; dst receives (its clock moves to the deadline). Returns the deadline."""
        t_send = self.shapers[src].now()
        t_deliver = self.shapers[src].on_send(src, dst, nbytes)
        self.shapers[dst].on_recv(src, dst, nbytes, t_send, t_deliver)
        return t_deliver

    def close(self):
        self.schedule.close()


def test_virtual_exact_totals_and_no_sleep():
    B, L = 100e6 / 8, 0.005  # 100 Mbit/s in bytes/s, 5 ms
    d = Devices(make_topology(devices(2), "full", Link(latency_ms=5, bandwidth_mbps=100)))
    c0, c1 = d.clocks
    wall0 = time.perf_counter()
    c0.advance(0.010)  # 10 ms of compute on device 0
    c1.advance(0.002)
    d.send(0, 1, MiB)
    assert c1.now() == pytest.approx(0.010 + MiB / B + L, abs=1e-12)
    c1.advance(0.003)
    d.send(1, 0, 4)
    assert c0.now() == pytest.approx(0.010 + MiB / B + L + 0.003 + 4 / B + L, abs=1e-12)
    # a message that arrives "in the past" leaves the receiver's clock alone
    c1.advance(1.0)
    before = c1.now()
    d.send(0, 1, 4)
    assert c1.now() == before
    took = time.perf_counter() - wall0
    print(f"\n  virtual: {c0.now() * 1e3:.3f} ms of emulated time in {took * 1e3:.3f} ms of wall time")
    assert took < 0.05
    d.close()


def test_virtual_incast_queues_on_the_shared_downlink():
    S, B, L, p = MiB, 100e6 / 8, 0.0005, PACKET_BYTES
    d = Devices(make_topology(devices(3), "star", Link(latency_ms=0.5, bandwidth_mbps=100)))
    first = d.send(1, 0, S)
    second = d.send(2, 0, S)
    # both uplinks finish at S/B; the downlink pipelines the first and queues the second behind it
    assert first == pytest.approx((S + p) / B + 2 * L, abs=1e-12)
    assert second == pytest.approx((2 * S + p) / B + 2 * L, abs=1e-12)
    d.close()


def test_virtual_pipelined_vs_store_and_forward():
    S, B, L, p = 64 * 1024, 300e6 / 8, 0.001, PACKET_BYTES
    link = Link(latency_ms=1, bandwidth_mbps=300)
    topo = make_topology(devices(2), "klonet", link)
    d = Devices(topo)
    assert d.send(1, 0, S) == pytest.approx(S / B + 3 * p / B + 4 * L, abs=1e-12)
    d.close()
    d = Devices(topo, packet_bytes=None)
    assert d.send(1, 0, S) == pytest.approx(4 * S / B + 4 * L, abs=1e-12)
    assert topo.idle_delay_s(1, 0, S) == pytest.approx(4 * S / B + 4 * L)
    d.close()


def test_virtual_sender_behind_in_time_is_not_queued_behind_the_future():
    """Device 1 is far ahead in virtual time and reserves the master's downlink for then; device 2,
    still early, must use the link now, not after device 1's reservation."""
    B, L = 100e6 / 8, 0.001
    d = Devices(make_topology(devices(3), "star", Link(latency_ms=1, bandwidth_mbps=100)))
    d.clocks[1].advance(10.0)
    d.send(1, 0, MiB)
    d.clocks[0]._t = 0.0  # rewind the receiver so we can observe device 2's delivery
    t = d.send(2, 0, 4)
    assert t == pytest.approx(2 * (4 / B) + 2 * L, abs=1e-12)
    d.close()


def test_virtual_compute_counts_cpu_time_over_speed():
    ticks = iter([1.0, 1.25, 2.0, 2.5])
    clock = VirtualClock(speed=0.5, cpu_time=lambda: next(ticks))
    with clock.compute():
        pass
    assert clock.now() == pytest.approx(0.5)  # 0.25 s of CPU on a half-speed device
    with clock.compute():
        pass
    assert clock.now() == pytest.approx(1.5) and clock.compute_s == pytest.approx(1.5)
    clock.advance(0.25)  # e.g. a disk load the caller modelled
    clock.advance_to(1.0)  # an old message: no change
    assert clock.now() == pytest.approx(1.75)
    with pytest.raises(TpiError, match="speed: must be > 0"):
        VirtualClock(speed=0)


def test_virtual_jitter_is_bounded_and_repeatable_and_loss_costs_an_rto():
    topo = make_topology(devices(2), "full", Link(latency_ms=5, jitter_ms=2))
    runs = []
    for _ in range(2):
        d = Devices(topo, seed=7)
        delays = []
        for _ in range(200):
            t0 = d.clocks[1].now()
            d.clocks[0]._t = t0
            delays.append(d.send(0, 1, 64) - t0)
        runs.append(delays)
        d.close()
    assert runs[0] == runs[1]
    assert 0.003 <= min(runs[0]) < 0.0035 and 0.0065 < max(runs[0]) <= 0.007
    assert statistics.mean(runs[0]) == pytest.approx(0.005, abs=0.0003)

    lossy = make_topology(devices(2), "full", Link(latency_ms=1, loss=0.5))
    d = Devices(lossy, seed=1)
    delays = []
    for _ in range(100):
        t0 = d.clocks[1].now()
        d.clocks[0]._t = t0
        delays.append(round(d.send(0, 1, 64) - t0, 9))
    assert set(delays) == {0.001, 0.201}  # delivered late by one RTO (200 ms minimum), never dropped
    assert 30 < delays.count(0.201) < 70
    d.close()


def test_ideal_route_is_a_pass_through():
    d = Devices(make_topology(devices(2), "full", Link()))
    d.clocks[0].advance(0.5)
    assert d.send(0, 1, MiB) == 0.5 and d.clocks[1].now() == 0.5
    d.close()
    wall = LinkShaper(make_topology(devices(2), "full", Link()), LinkSchedule.create(2), 0)
    t = wall.now()
    assert t <= wall.on_send(0, 1, 10) <= time.perf_counter()
    wall.schedule.close()


def test_schedule_pickles_and_is_shared_across_processes():
    ctx = mp.get_context("spawn")  # no inheritance: the schedule must re-attach by its path
    with LinkSchedule.create(3) as schedule:
        with ctx.Pool(1) as pool:
            pool.apply(_reserve_in_child, (schedule,))
        with schedule.locked() as view:
            assert view[0:2].tolist() == [1.0, 2.0]
        assert isinstance(WallClock().now(), float)


def _reserve_in_child(schedule: LinkSchedule) -> None:
    with schedule.locked() as view:
        schedule.reserve(view, 0, 1.0, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------------
# Kernel backend (namespaces + veth + bridge + tbf). Needs root and iproute2; otherwise it must say so.

SERVER = """
import socket, sys, time
s = socket.create_server(("0.0.0.0", 5599))
print("up", flush=True)
c, _ = s.accept()
n, t0, buf = 0, None, bytearray(1 << 20)
while True:
    k = c.recv_into(buf)
    if not k:
        break
    t0 = t0 or time.perf_counter()
    n += k
print(n, time.perf_counter() - t0)
"""
CLIENT = """
import socket, sys, time
for _ in range(200):
    try:
        s = socket.create_connection((sys.argv[1], 5599))
        break
    except OSError:
        time.sleep(0.01)
s.sendall(bytes(int(sys.argv[2])))
s.close()
"""


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_tc_backend_rate_only_with_tbf():
    topo = make_topology(devices(2), "star", Link(bandwidth_mbps=100))
    reason = tc_available()
    if reason is not None:  # no iproute2 or not root: the backend must refuse clearly
        with pytest.raises(TpiError, match="tc backend: .*use the user-space shaper"):
            TcNetwork(topo).open()
        print(f"\n  tc backend unavailable here, refused with: {reason}")
        return
    before = _netns_names()
    with TcNetwork(topo) as net:
        assert {net.switch, net.namespace(0), net.namespace(1)} <= _netns_names()
        server = subprocess.Popen(net.exec_prefix(0) + [sys.executable, "-c", SERVER], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout.readline().strip() == "up"
            subprocess.run(net.exec_prefix(1) + [sys.executable, "-c", CLIENT, net.address(0), str(4 * MiB)],
                           check=True, timeout=20)
            n, took = server.communicate(timeout=20)[0].split()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    mbps = int(n) * 8 / float(took) / 1e6
    report("tc tbf 100 Mbit/s, 4 MiB over TCP (goodput)", int(n) * 8 / 100e6 * 1e3, float(took) * 1e3, "10%")
    print(f"  goodput {mbps:.1f} Mbit/s")
    assert int(n) == 4 * MiB and mbps == pytest.approx(100, rel=0.10)
    assert _netns_names() == before  # everything we created is gone


def test_tc_backend_refuses_delay_without_netem_and_cleans_up():
    topo = make_topology(devices(2), "star", Link(latency_ms=1, bandwidth_mbps=100))
    reason = tc_available()
    if reason is not None:
        with pytest.raises(TpiError, match="tc backend: "):
            TcNetwork(topo).open()
        return
    before = _netns_names()
    probe = TcNetwork(topo)
    try:
        probe.open()
    except TpiError as e:
        assert str(e) == NO_NETEM  # this kernel has no sch_netem
    else:  # a kernel with netem: delay is shaped in the kernel instead
        probe.close()
    assert _netns_names() == before
    with pytest.raises(TpiError, match="only star topologies"):
        TcNetwork(klonet(1.0))
