"""Everything a device spends is charged on its virtual clock: disk reads (window, on-demand, resident first
touch, embedding rows) through the disk model, reductions, sampling and the loader thread's widening."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.config.compute_model import Free, Roofline
from emulator.config.topology import (
    DEFAULT_DISK_LATENCY_MS,
    DEFAULT_DISK_READ_MBPS,
    Machine,
)
from emulator.net.clock import VirtualClock
from tpicore.comm.collectives import Collective
from tpicore.model.cost import Work
from tpicore.runtime import device as device_mod
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.env import DeviceEnv, DiskModel, reduction_work
from tpicore.runtime.generate import generate
from tpicore.runtime.ondemand import OnDemandSource
from tpicore.runtime.window import WindowSource
from tpicore.weights.store import TensorStore

IDS = np.asarray([3, 9, 3, 27])  # token 3 twice
MBPS, LATENCY_MS = 80.0, 2.0  # 10 MB/s, 2 ms a read
DISK = DiskModel(MBPS, latency_ms=LATENCY_MS)


def read_s(nbytes: int) -> float:
    return LATENCY_MS / 1e3 + nbytes / (MBPS * 1e6 / 8)


def row_bytes(store: TensorStore) -> int:
    table = store.ckpt.info("model.embed_tokens.weight")
    return table.nbytes // table.shape[0]


def free_clock() -> VirtualClock:
    return VirtualClock(model=Free())


@pytest.mark.parametrize("kind", ["window", "ondemand", "resident"])
def test_embedding_rows_alone_cost_bytes_over_rate_plus_latency(hf_models, kind):
    """Compute free, nothing but the embedding: virtual time = rows' bytes / disk rate + one latency."""
    model_dir, _ = hf_models("gqa", "bfloat16")
    store = TensorStore.from_model_dir(model_dir)
    clock = free_clock()
    env = DeviceEnv(clock=clock, disk=DISK)
    src = {"window": lambda: WindowSource(store, 2, env=env), "ondemand": lambda: OnDemandSource(store, env=env),
           "resident": lambda: ResidentSource(store, env=env)}[kind]()
    dev = Device(store, src, 16, clock=clock)
    try:
        dev.embed(IDS)
        rows = len(set(IDS.tolist())) if kind == "resident" else len(IDS)  # resident: each row's first touch only
        assert clock.now() == pytest.approx(read_s(rows * row_bytes(store)), rel=1e-12)
        assert dev.timers.compute_s == pytest.approx(0.0, abs=1e-15)  # booked as a load, not compute
        if kind == "resident":
            t = clock.now()
            dev.embed(IDS)  # in memory now: no second charge
            assert clock.now() == t
    finally:
        dev.close()


def test_resident_first_touch_is_charged_once(hf_models):
    model_dir, _ = hf_models("gqa")
    store = TensorStore.from_model_dir(model_dir)
    clock = free_clock()
    dev = Device(store, ResidentSource(store, env=DeviceEnv(clock=clock, disk=DISK)), 16, clock=clock)
    try:
        dev.step(np.asarray([5]), 0)
        n = store.cfg.num_hidden_layers
        blocks = [("attn", i) for i in range(n)] + [("ffn", i) for i in range(n)] + [("post", -1)]
        expected = sum(read_s(store.block_nbytes(b)) for b in blocks) + read_s(row_bytes(store))
        assert clock.now() == pytest.approx(expected, rel=1e-12)
        assert dev.timers.loaded_bytes == sum(store.block_nbytes(b) for b in blocks) + row_bytes(store)
        dev.step(np.asarray([5]), 1)  # every block and the row are resident: nothing more is read
        assert clock.now() == pytest.approx(expected, rel=1e-12)
    finally:
        dev.close()


def test_window_loads_include_latency(hf_models):
    """Window loads: every block and embedding row through the disk model, latency included."""
    model_dir, _ = hf_models("gqa")
    store = TensorStore.from_model_dir(model_dir)
    clock = free_clock()
    src = WindowSource(store, 2, env=DeviceEnv(clock=clock, disk=DISK))
    dev = Device(store, src, 16, clock=clock)
    try:
        dev.step(np.asarray([5]), 0)
        # the disk never idles for a free-compute device with a window: time = every block's read back to
        # back (the loader) overlapped with the row's read
        blocks = sum(read_s(store.block_nbytes(b)) for b in src.order)
        assert clock.now() == pytest.approx(blocks, rel=1e-9)
        assert dev.timers.loaded_bytes >= sum(store.block_nbytes(b) for b in src.order) + row_bytes(store)
    finally:
        dev.close()


def test_loader_widening_is_charged(hf_models):
    """bf16 weights widened to float32 by the loader thread: its CPU time is charged on the loader's
    timeline (measured model: CPU / speed) on top of the modelled disk."""
    model_dir, _ = hf_models("gqa", "bfloat16")
    store = TensorStore.from_model_dir(model_dir)
    clock = VirtualClock(2.0)
    src = WindowSource(store, 2, env=DeviceEnv(clock=clock, disk=DiskModel(8000.0)))
    dev = Device(store, src, 16, clock=clock)
    try:
        generate(dev.step, [1, 2], 2, max_seq=16)
        assert src.reader.widen_cpu_s > 0
        block_loads = dev.timers.load_s - read_embed(dev, store)  # the loader's share of load time
        disk_only = sum(DiskModel(8000.0).floor_s(store.block_nbytes(b)) for b in src.order) * 2
        assert block_loads > disk_only
    finally:
        dev.close()


def read_embed(dev: Device, store: TensorStore) -> float:
    """Load time of the embedding rows read so far ([1, 2] then one fed back token)."""
    return DiskModel(8000.0).floor_s(3 * row_bytes(store))


class FakeGroup:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.mesh, self.channels = rank, world_size, True, {}


def test_reduction_work_per_algorithm():
    star0 = reduction_work(Collective(FakeGroup(0, 4), "star"), 1000)
    assert star0 == Work(3000, 4 * 3 * 3000)  # the root adds 3 vectors: read two, write one
    assert reduction_work(Collective(FakeGroup(2, 4), "star"), 1000) == Work(0, 0)
    assert reduction_work(Collective(FakeGroup(1, 4), "ring"), 1000).flops == 750  # 3 chunks of 250
    assert reduction_work(Collective(FakeGroup(0, 8), "tree"), 1000).flops == 3000  # three children
    assert reduction_work(lambda x: x, 1000) == Work()


def test_allreduce_adds_are_charged_on_the_clock(hf_models, monkeypatch):
    """The reduction inside each allreduce costs its roofline on the device's clock."""
    model_dir, _ = hf_models("gqa")
    store = TensorStore.from_model_dir(model_dir)
    roof = Roofline(mem_bandwidth_gbytes_s=1.0, peak_gflops=1e9)
    clock = VirtualClock(model=roof)
    work = Work(0, 1e6)  # 1 ms at 1 GB/s per allreduce
    monkeypatch.setattr(device_mod, "reduction_work", lambda allreduce, size: work)
    dev = Device(store, ResidentSource(store), 16, allreduce=lambda x: x, clock=clock)
    try:
        x = np.ones((1, store.cfg.hidden_size), dtype=np.float32)
        dev.allreduce(x)
        assert clock.now() == pytest.approx(1e-3, rel=1e-12)
        assert dev.timers.comm_s == pytest.approx(1e-3, rel=1e-12)  # part of the collective
    finally:
        dev.close()


def test_sampling_is_charged():
    V = 1000
    roof = Roofline(mem_bandwidth_gbytes_s=1.0, peak_gflops=1e9)
    clock = VirtualClock(model=roof)
    logits = np.zeros((1, V), dtype=np.float32)
    gen = generate(lambda ids, pos, all_logits: logits, [1], 3, max_seq=8, now=clock.now, clock=clock)
    per_sample = 4 * V / 1e9  # the logits read once
    assert clock.now() == pytest.approx(3 * per_sample, rel=1e-12)
    assert gen.ttft_s == pytest.approx(per_sample, rel=1e-12)


def test_every_machine_has_a_disk_model_by_default():
    m = Machine(name="a", cores=1, mem_bytes="1GiB")
    assert (m.disk_read_mbps, m.disk_latency_ms) == (DEFAULT_DISK_READ_MBPS, DEFAULT_DISK_LATENCY_MS)
    assert Machine(name="a", cores=1, mem_bytes="1GiB", disk_read_mbps=None).disk_read_mbps is None
