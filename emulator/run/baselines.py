"""The six things an emulation run can be (`options.mode`), as they run inside the device processes.

Every mode uses the same model files, the same emulated devices (clock, speed, disk, memory cap) and
the same links (LinkShaper on every message), so the comparison is fair:

    mode           devices   weights                          between devices
    tpi            all N     window (options.window) or none  allreduce (options.allreduce, star default)
    galaxy         all N     resident                         ring allreduce
    pipeline       all N     resident, stage r: its layers    hidden state r -> r+1 -> ... -> master
    standalone     first     resident                         -
    offload        first     read on demand, blocking         -       (tpicore.offload.OnDemandSource)
    standalone+ms  first     window (default 2)               -       (tpicore.scheduler.WindowSource)

The master process (rank 0) drives generation through a *driver*: `step(ids, pos, all_logits)`,
`collect()` (every rank's report so far: timers, window statistics, trace events, peak RSS; the
launcher diffs two for one run's split) and `close()`. Workers run `run_worker` (tensor parallel, in
tpicore.parallel) or `pipeline_worker` (here). The launcher (emulator/launcher.py) forks the processes,
applies the limits and records the results; it calls into this module only from device processes.

Pipeline stages here answer a "report" request between runs (tpicore.pipeline.stage_loop only knows
"stop"), and book the time a stage waits for its input as comm_s (that wait includes the other stages'
compute: one request, so only one stage computes at a time).

Resident weights of a unique-layer model (model.unique_layers K < L layers, f32 stored) are memory
maps of K stored layers, so the measured RSS holds K layers where a real model holds L:
`resident_extra_bytes` is what the L - K repeated layers would add, reported beside the measurement.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from tpicore.comm.wire import Kind, parse_json
from tpicore.runtime.device import Device, ResidentSource
from tpicore.weights.store import TensorStore
from tpicore.errors import TpiError

MODES_DOC = __doc__


def open_store(path: str) -> TensorStore:
    """A shard folder (manifest.json: tpi shard / unique_synth output) or an HF checkpoint folder."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return TensorStore.from_shard_dir(path)
    return TensorStore.from_model_dir(path)


def device_layers(cfg, n_layers: int) -> list[range]:
    """The layers each rank runs: all of them (tensor parallel, one device) or its pipeline stage."""
    if cfg.options.mode == "pipeline":
        from tpicore.dist.pipeline import plan_stages

        return plan_stages(n_layers, cfg.world_size, cfg.ratios())
    return [range(n_layers)] * cfg.world_size


def device_report(rank: int, dev: Device, trace: bool) -> dict:
    """What a rank reports: peak RSS, page cache of its files, time split, window statistics, events."""
    rep = copy.deepcopy(dev.report())  # the window's statistics are live: the caller diffs two reports
    return {"rank": rank, **rep, "events": list(dev.timers.events) if trace else []}


def resident_extra_bytes(cfg, dirs: list[str]) -> list[int]:
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


class TensorParallel:
    """tpi / galaxy: tpicore.parallel.Master over the emulated links."""

    def __init__(self, plan, store: TensorStore, max_seq: int, clock, shaper) -> None:
        from dataclasses import fields

        from tpicore.comm.transport import Group
        from tpicore.dist.tensor_parallel import Master, RunOptions

        cfg = plan.cfg
        o = cfg.options
        self.group = Group.master(cfg.world_size, secret=plan.secret, fingerprint=store.fingerprint,
                                  timeout_s=o.timeout_s, listener=plan.listener, mesh=o.allreduce != "star")
        self.group.link_hook = shaper
        extra: dict[str, Any] = {}
        if "drop_cache" in {f.name for f in fields(RunOptions)}:
            extra["drop_cache"] = o.drop_cache
        opts = RunOptions(max_seq=max_seq, allreduce=o.allreduce, window=o.window, retain_every=o.retain_every,
                          trace=o.trace, **extra)
        self.master = Master(self.group, store, opts, clock, cfg.topology.devices[0].disk_read_mbps)
        self.step = self.master.step

    def collect(self) -> list[dict]:
        reports = self.master.collect()
        reports[0] = copy.deepcopy(reports[0])  # rank 0's own is live (its events list, its window)
        return reports

    def close(self) -> None:
        try:
            self.master.finish()
            self.master.close()
        finally:
            self.group.close()


class Pipeline:
    """pipeline: stage 0 (with the embedding and LM head) here, stages 1..N-1 in `pipeline_worker`."""

    def __init__(self, plan, store: TensorStore, max_seq: int, clock, shaper) -> None:
        from tpicore.comm.transport import Group
        from tpicore.dist.pipeline import PipelineMaster, make_stage

        cfg = plan.cfg
        o = cfg.options
        n = cfg.world_size
        stages = device_layers(cfg, store.cfg.num_hidden_layers)
        self.group = Group.master(n, secret=plan.secret, fingerprint=pipeline_fingerprint(plan),
                                  timeout_s=o.timeout_s, listener=plan.listener, mesh=True)
        self.group.link_hook = shaper
        for r in range(1, n):
            self.group.channel(r).send_json(Kind.CONTROL, {"op": "setup", "max_seq": max_seq, "trace": o.trace})
        self.dev = make_stage(store, stages[0], max_seq, clock)
        self.dev.timers.trace = o.trace
        self.master = PipelineMaster(self.group, self.dev)
        self.step = self.master.step
        self.trace = o.trace

    def collect(self) -> list[dict]:
        """The request travels down the pipeline; each stage answers the master directly."""
        n = self.group.world_size
        if n > 1:
            self.group.channel(1).send_json(Kind.CONTROL, {"op": "report"})
        reports = [device_report(0, self.dev, self.trace)]
        for r in range(1, n):
            msg = self.group.channel(r).recv_json(Kind.CONTROL)
            msg.pop("op", None)
            reports.append(msg)
        return reports

    def close(self) -> None:
        try:
            self.master.finish()
            self.dev.close()
        finally:
            self.group.close()


class OneDevice:
    """standalone / offload / standalone+ms: the first device alone, no links."""

    def __init__(self, plan, store: TensorStore, max_seq: int, clock, shaper=None) -> None:
        cfg = plan.cfg
        o = cfg.options
        disk = cfg.topology.devices[0].disk_read_mbps
        if o.mode == "standalone":
            source = ResidentSource(store)
        elif o.mode == "offload":
            from tpicore.runtime.ondemand import OnDemandSource

            source = OnDemandSource(store, clock=clock, disk_read_mbps=disk, drop_cache=o.drop_cache)
        elif o.mode == "standalone+ms":
            from tpicore.runtime.window import WindowSource

            source = WindowSource(store, window=o.window, retain_every=o.retain_every, clock=clock,
                                  disk_read_mbps=disk, drop_cache=o.drop_cache)
        else:
            raise TpiError(f"options.mode: {o.mode!r} does not run on one device")
        self.dev = Device(store, source, max_seq, clock=clock)
        if hasattr(source, "attach"):  # idempotent: engines that attach in Device() already did
            source.attach(self.dev.timers)
        self.dev.timers.trace = o.trace
        self.step = self.dev.step
        self.trace = o.trace

    def collect(self) -> list[dict]:
        return [device_report(0, self.dev, self.trace)]

    def close(self) -> None:
        self.dev.close()


def open_driver(plan, store: TensorStore, max_seq: int, clock, shaper):
    mode = plan.cfg.options.mode
    if plan.cfg.options.tensor_parallel:
        return TensorParallel(plan, store, max_seq, clock, shaper)
    if mode == "pipeline":
        return Pipeline(plan, store, max_seq, clock, shaper)
    return OneDevice(plan, store, max_seq, clock, shaper)


def pipeline_fingerprint(plan) -> str:
    """Every stage reads the same folder: its path (and the split) identify the run."""
    return f"pipeline:{os.path.realpath(plan.shard_dirs[0])}:{plan.cfg.world_size}"


# ---------------------------------------------------------------------------------------------------
# Pipeline worker stages (ranks 1..N-1)


def pipeline_worker(plan, rank: int, clock, shaper) -> dict:
    """Serve steps from the previous stage until a stop comes down the pipeline; answer reports."""
    from tpicore.comm.transport import Group
    from tpicore.dist.pipeline import make_stage

    cfg = plan.cfg
    n = cfg.world_size
    store = open_store(plan.shard_dirs[rank])
    group = Group.worker(rank, plan.addr, world_size=n, secret=plan.secret, fingerprint=pipeline_fingerprint(plan),
                         timeout_s=cfg.options.timeout_s)
    group.link_hook = shaper
    dev = None
    try:
        setup = group.channel(0).recv_json(Kind.CONTROL)
        if setup.get("op") != "setup":
            raise TpiError(f"rank {rank}: expected a setup message from the master, got {setup.get('op')!r}")
        dev = make_stage(store, device_layers(cfg, store.cfg.num_hidden_layers)[rank], setup["max_seq"], clock)
        dev.timers.trace = bool(setup.get("trace"))
        prev, nxt = group.channel(rank - 1), (rank + 1) % n
        t = dev.timers
        while True:
            t0 = clock.now()
            hdr, payload = prev.recv_any((Kind.CONTROL, Kind.TENSOR))
            if hdr.kind == Kind.CONTROL:
                op = parse_json(payload, prev.peer).get("op")
                if op == "report":
                    group.channel(0).send_json(Kind.CONTROL, {"op": "report", **device_report(rank, dev, t.trace)})
                if op in ("report", "stop"):
                    if nxt:
                        group.channel(nxt).send_json(Kind.CONTROL, {"op": op})
                    if op == "stop":
                        break
                    continue
                raise TpiError(f"rank {rank}: unexpected control message {op!r} from {prev.peer}")
            positions = payload.reshape(-1)  # [T] int64
            x = prev.recv_array(Kind.TENSOR)  # [T, D]
            waited = clock.now() - t0
            t.comm_s += waited
            if t.trace:
                t.events.append(("wait", "comm", t0, waited))
            x = dev.layers(x, int(positions[0]))
            t1 = clock.now()
            out = group.channel(nxt)
            out.send_array(Kind.TENSOR, positions)
            out.send_array(Kind.TENSOR, np.ascontiguousarray(x))
            t.comm_s += clock.now() - t1
        return device_report(rank, dev, t.trace)
    finally:
        if dev is not None:
            dev.close()
        group.close()
