"""The six things an emulation run can be (`options.mode`), as they run inside the device processes.

Every mode uses the same model files, the same emulated devices (clock, speed, disk, memory cap) and
the same links (LinkShaper on every message), so the comparison is fair:

    mode           devices   weights                          between devices
    tpi            all N     window (options.window) or none  allreduce (options.allreduce, star default)
    galaxy         all N     resident                         ring allreduce
    pipeline       all N     resident, stage r: its layers    hidden state r -> r+1 -> ... -> master
    standalone     first     resident                         -
    offload        first     read on demand, blocking         -       (tpicore.runtime.ondemand)
    standalone+ms  first     window (default 2)               -       (tpicore.runtime.window)

The master process (rank 0) drives generation through a `Driver`: `step(ids, pos, all_logits)`,
`collect()` (every rank's RankReport so far; the master diffs two for one run's split), `recoveries`
(tpicore.dist.failover.Recovery, one per lost device recovered from), `rank_devices()` (the topology
device of each current rank: after a loss the survivors are renumbered) and `close()`.
tpi/galaxy with options.failover (the default) use tpicore.dist.elastic.ElasticMaster, as `tpi generate`
does: a lost device is found, the survivors re-split the model (options.slices: each re-shards its own
copy of the model, `local`, or rank 0 sends the files, `master`), the history is replayed. No lobby:
the emulator starts no spare devices.
Workers run `tpicore.dist.tensor_parallel.run_worker` or `pipeline_worker` (here: a setup message from
the master, then tpicore.dist.pipeline's one stage loop). Every device gets its emulated world as one
DeviceEnv (clock, disk model, link shaper), built by emulator/run/device.py.

Resident weights of a unique-layer model (model.unique_layers K < L layers, f32 stored) are memory
maps of K stored layers, so the measured RSS holds K layers where a real model holds L:
`resident_extra_bytes` is what the L - K repeated layers would add, reported beside the measurement.

Layer: run. Must not fork, apply limits or write results (emulator/run/launcher.py and supervisor.py do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from socket import socket
from typing import Any, Protocol

import numpy as np

from emulator.config.run_config import RunConfig
from emulator.net.network import Network
from tpicore.comm.frame import Kind
from tpicore.comm.group import Group
from tpicore.dist.elastic import ElasticMaster, keep_shares
from tpicore.dist.failover import Recovery, SliceSource
from tpicore.dist.pipeline import PipelineMaster, make_stage, plan_stages, stage_loop
from tpicore.dist.tensor_parallel import Master, RunOptions
from tpicore.errors import TpiError
from tpicore.model.split import check_ratios
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.ondemand import OnDemandSource
from tpicore.runtime.report import RankReport
from tpicore.runtime.window import WindowSource
from tpicore.weights.store import TensorStore


@dataclass
class DeviceSetup:
    """Everything a device process needs; inherited through fork, never pickled."""

    cfg: RunConfig
    shard_dirs: list[str]
    prompts: list[list[int]]
    max_seq: int
    network: Network  # the run's links (emulator/net/network.py): enter() in the device, then hook()
    listener: socket
    addr: str
    secret: bytes
    model_dir: str | None = None  # the model every device holds a copy of (failover, options.slices: local)
    slices_dir: str | None = None  # per-run folder: each device's cache for the slices of a new split
    faults_ack_r: int | None = None  # the master reads one byte per fault point once the supervisor struck
    link_down_until: Any = None  # shared doubles, one per device: its links are down until (perf_counter)

    def slice_cache(self, rank: int) -> str | None:
        """Device `rank`'s own cache for re-sharded slices (cold in every run: a fresh folder)."""
        return os.path.join(self.slices_dir, f"d{rank}") if self.slices_dir else None


class Driver(Protocol):
    """How the master drives one mode: a forward step, every rank's report so far, and the end."""

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray: ...

    def collect(self) -> list[RankReport]: ...

    @property
    def recoveries(self) -> list[Recovery]: ...

    def rank_devices(self) -> list[int]: ...

    def close(self) -> None: ...


class _NoFailover:
    """The drivers that never regroup: no recoveries, rank r is device r."""

    world_size = 1

    @property
    def recoveries(self) -> list[Recovery]:
        return []

    def rank_devices(self) -> list[int]:
        return list(range(self.world_size))


def open_store(path: str) -> TensorStore:
    """A shard folder (manifest.json: tpi shard / tpi synth --devices output) or an HF checkpoint folder."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return TensorStore.from_shard_dir(path)
    return TensorStore.from_model_dir(path)


def device_layers(cfg: RunConfig, n_layers: int) -> list[range]:
    """The layers each rank runs: all of them (tensor parallel, one device) or its pipeline stage."""
    if cfg.options.mode == "pipeline":
        return plan_stages(n_layers, cfg.world_size, cfg.ratios())
    return [range(n_layers)] * cfg.world_size


def resident_extra_bytes(cfg: RunConfig, dirs: list[str]) -> list[int]:
    """Per rank: bytes the repeated layers of a unique-layer model would add to resident weights.

    Zero unless weights are resident (no window, not offload), the model has unique layers, and they
    are stored as f32 (memory-mapped without a copy; f16/bf16 are upcast into a copy per logical layer,
    which the RSS already shows).
    """
    n = cfg.world_size
    if not cfg.model.unique or cfg.options.window is not None or cfg.options.mode == "offload":
        return [0] * n
    out = []
    stores: dict[str, TensorStore] = {}
    for rank in range(n):
        store = stores.get(dirs[rank]) or stores.setdefault(dirs[rank], open_store(dirs[rank]))
        layers = device_layers(cfg, store.cfg.num_hidden_layers)[rank]
        if not layers:
            out.append(0)
            continue
        first = layers[0]
        names = list(store.leaves(("attn", first)).values()) + list(store.leaves(("ffn", first)).values())
        infos = [store.ckpt.info(name) for name in names]
        if any(info.dtype != "F32" for info in infos):
            out.append(0)
            continue
        per_layer = sum(info.nbytes for info in infos)
        stored = {store.layer_map[layer] for layer in layers}
        out.append((len(layers) - len(stored)) * per_layer)
    return out


# ---------------------------------------------------------------------------------------------------
# Master-side drivers (rank 0)


def failover_on(cfg: RunConfig) -> bool:
    """Whether the tensor-parallel devices run with failover (a worker then needs its model copy): in a run
    with `faults:` (a device the config does not plan to lose ending is a crash of the run either way)."""
    return cfg.options.failover and bool(cfg.faults) and cfg.options.tensor_parallel and cfg.world_size > 1


class TensorParallel:
    """tpi / galaxy: tpicore.dist.tensor_parallel.Master over the emulated links, or with failover (the
    default) tpicore.dist.elastic.ElasticMaster: the same Master, recovering from a lost device."""

    def __init__(self, setup: DeviceSetup, store: TensorStore, max_seq: int, env: DeviceEnv) -> None:
        cfg = setup.cfg
        o = cfg.options
        self.cfg, n = cfg, cfg.world_size
        fo = failover_on(cfg)
        self.group = Group.master(n, secret=setup.secret, fingerprint=store.fingerprint,
                                  timeout_s=o.timeout_s, listener=setup.listener, mesh=o.allreduce != "star")
        opts = RunOptions(max_seq=max_seq, allreduce=o.allreduce, window=o.window, retain_every=o.retain_every,
                          trace=o.trace, drop_cache=o.drop_cache, failover=fo)
        self.master: Master | ElasticMaster
        if fo:
            if setup.model_dir is None:
                raise TpiError("options.failover: the master has no model folder to re-split after a loss")
            slices = SliceSource(setup.model_dir, None, None, o.private_layers, cache_root=setup.slice_cache(0))
            self.master = ElasticMaster(self.group, store, opts, lobby=None, slices=slices,
                                        ratios=tuple(check_ratios(cfg.ratios(), n)), placement=self.placement,
                                        target_world=n, env=env)
        else:
            self.master = Master(self.group, store, opts, env)
        self.step = self.master.step

    def placement(self, kept: list[int], ratios: tuple[float, ...]) -> tuple[float, ...]:
        """Ratios for the master + `kept` (current ranks): equal shares stay equal; speed or given shares
        stay each survivor's own."""
        if self.cfg.options.ratios == "equal":
            return tuple(check_ratios(None, 1 + len(kept)))
        return keep_shares(kept, ratios)

    @property
    def recoveries(self) -> list[Recovery]:
        return self.master.recoveries if isinstance(self.master, ElasticMaster) else []

    def rank_devices(self) -> list[int]:
        """The topology device holding each current rank (no spares: a member id is its first rank)."""
        if isinstance(self.master, ElasticMaster):
            return [self.master.member_of[r] for r in range(self.master.group.world_size)]
        return list(range(self.cfg.world_size))

    def collect(self) -> list[RankReport]:
        return self.master.collect()

    def close(self) -> None:
        groups = {id(g): g for g in (self.group, self.master.group)}
        try:
            self.master.finish()
            self.master.close()
        finally:
            for g in groups.values():
                g.close()


class Pipeline(_NoFailover):
    """pipeline: stage 0 (with the embedding and LM head) here, stages 1..N-1 in `pipeline_worker`."""

    def __init__(self, setup: DeviceSetup, store: TensorStore, max_seq: int, env: DeviceEnv) -> None:
        cfg = setup.cfg
        o = cfg.options
        n = cfg.world_size
        stages = device_layers(cfg, store.cfg.num_hidden_layers)
        self.group = Group.master(n, secret=setup.secret, fingerprint=pipeline_fingerprint(setup),
                                  timeout_s=o.timeout_s, listener=setup.listener, mesh=True)
        self.group.link_hook = env.link_hook
        for r in range(1, n):
            self.group.channel(r).send_json(Kind.CONTROL, {"op": "setup", "max_seq": max_seq, "trace": o.trace})
        self.dev = make_stage(store, stages[0], max_seq, env.clock, env)
        self.dev.timers.trace = o.trace
        self.master = PipelineMaster(self.group, self.dev)
        self.step = self.master.step
        self.world_size = n

    def collect(self) -> list[RankReport]:
        return self.master.collect()

    def close(self) -> None:
        try:
            self.master.finish()
            self.dev.close()
        finally:
            self.group.close()


class OneDevice(_NoFailover):
    """standalone / offload / standalone+ms: the first device alone, no links."""

    def __init__(self, setup: DeviceSetup, store: TensorStore, max_seq: int, env: DeviceEnv) -> None:
        o = setup.cfg.options
        if o.mode == "standalone":
            source = ResidentSource(store, env=env)
        elif o.mode == "offload":
            source = OnDemandSource(store, env=env, drop_cache=o.drop_cache)
        elif o.mode == "standalone+ms":
            source = WindowSource(store, window=o.window, retain_every=o.retain_every, env=env,
                                  drop_cache=o.drop_cache)
        else:
            raise TpiError(f"options.mode: {o.mode!r} does not run on one device")
        self.dev = Device(store, source, max_seq, clock=env.clock)
        self.dev.timers.trace = o.trace
        self.step = self.dev.step

    def collect(self) -> list[RankReport]:
        return [self.dev.report(0)]

    def close(self) -> None:
        self.dev.close()


def open_driver(setup: DeviceSetup, store: TensorStore, max_seq: int, env: DeviceEnv) -> Driver:
    if setup.cfg.options.tensor_parallel:
        return TensorParallel(setup, store, max_seq, env)
    if setup.cfg.options.mode == "pipeline":
        return Pipeline(setup, store, max_seq, env)
    return OneDevice(setup, store, max_seq, env)


def pipeline_fingerprint(setup: DeviceSetup) -> str:
    """Every stage reads the same folder: its path (and the split) identify the run."""
    return f"pipeline:{os.path.realpath(setup.shard_dirs[0])}:{setup.cfg.world_size}"


# ---------------------------------------------------------------------------------------------------
# Pipeline worker stages (ranks 1..N-1)


def pipeline_worker(setup: DeviceSetup, rank: int, env: DeviceEnv) -> RankReport:
    """Wait for the master's setup (max_seq: known once it has tokenized the prompt), then serve as
    stage `rank` (tpicore.dist.pipeline.stage_loop) until a stop comes down the pipeline."""
    cfg = setup.cfg
    store = open_store(setup.shard_dirs[rank])
    group = Group.worker(rank, setup.addr, world_size=cfg.world_size, secret=setup.secret,
                         fingerprint=pipeline_fingerprint(setup), timeout_s=cfg.options.timeout_s)
    group.link_hook = env.link_hook
    dev = None
    try:
        msg = group.channel(0).recv_json(Kind.CONTROL)
        if msg.get("op") != "setup":
            raise TpiError(f"rank {rank}: expected a setup message from the master, got {msg.get('op')!r}")
        dev = make_stage(store, device_layers(cfg, store.cfg.num_hidden_layers)[rank], msg["max_seq"], env.clock, env)
        dev.timers.trace = bool(msg.get("trace"))
        return stage_loop(group, dev)
    finally:
        if dev is not None:
            dev.close()
        group.close()
