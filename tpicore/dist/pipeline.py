"""Pipeline-parallel baseline: layers split across N devices, the hidden state passed along.

Layer: dist. Owns the paper's "MP" / llama.cpp-RPC comparison point and its ONE stage loop (the
emulator's pipeline mode runs the same `stage_loop` and `PipelineMaster`): stage r holds whole layers
[a_r, b_r) and, per step, receives positions + hidden states from stage r-1, runs its layers, and sends
them on; the last stage returns them to the master (rank 0), which also owns the embedding and LM head.
Only one stage computes at a time (one request, as in the paper), so the time a stage waits for its
input (booked as comm_s, with sending its output) includes the other stages' compute.

Control messages travel down the pipeline like a step: "stop" ends every stage, "report" (between
generations) makes each stage send its RankReport to the master and serve on. Uses the same transport
and Device as the tensor-parallel runtime; must not contain model math.
"""

from __future__ import annotations

import os
import secrets
import sys

import numpy as np

from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.endpoint import open_listener
from tpicore.comm.frame import Kind, parse_json
from tpicore.comm.group import Group
from tpicore.dist.local_workers import LocalWorkers
from tpicore.dist.tensor_parallel import set_blas_threads
from tpicore.errors import TpiError
from tpicore.model.split import apportion
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.env import Clock, DeviceEnv
from tpicore.runtime.generate import generate
from tpicore.runtime.report import RankReport, TraceEvent
from tpicore.weights.store import TensorStore


def plan_stages(n_layers: int, world_size: int, ratios: list[float] | None = None) -> list[range]:
    """Contiguous layer ranges per stage, proportional to ratios, each at least one layer."""
    if world_size > n_layers:
        raise TpiError(f"--devices: {world_size} pipeline stages cannot split {n_layers} layers; "
                       f"use at most {n_layers} devices")
    counts = apportion(n_layers, ratios or [1.0] * world_size)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [range(int(starts[r]), int(starts[r + 1])) for r in range(world_size)]


def make_stage(store: TensorStore, layers: range, max_seq: int, clock: Clock | None = None,
               env: DeviceEnv | None = None) -> Device:
    """A stage's device, weights resident (their first touch charged through env's disk, when given)."""
    return Device(store, ResidentSource(store, env=env), max_seq, clock=clock, layer_ids=layers)


def _send_on(group: Group, dst: int, positions: np.ndarray, x: np.ndarray) -> None:
    ch = group.channel(dst)
    ch.send_array(Kind.TENSOR, positions)  # [T] int64
    ch.send_array(Kind.TENSOR, np.ascontiguousarray(x))  # [T, D] float32


def stage_loop(group: Group, dev: Device) -> RankReport:
    """A worker stage: serve steps from the previous stage until a stop comes down the pipeline; answer
    "report" requests to the master on the way. Returns this stage's final report."""
    r, n = group.rank, group.world_size
    prev = group.channel(r - 1)
    nxt = (r + 1) % n
    clock, t = dev.clock, dev.timers
    while True:
        t0 = clock.now()
        hdr, payload = prev.recv_any((Kind.CONTROL, Kind.TENSOR))
        if hdr.kind == Kind.CONTROL:
            op = parse_json(payload, prev.peer).get("op")
            if op not in ("report", "stop"):
                raise TpiError(f"rank {r}: unexpected control message {op!r} from {prev.peer}")
            if op == "report":
                group.channel(0).send_json(Kind.CONTROL, {"op": "report", **dev.report(r).to_json()})
            if nxt:
                group.channel(nxt).send_json(Kind.CONTROL, {"op": op})
            if op == "stop":
                break
            continue
        positions = payload.reshape(-1)  # [T] int64
        x = prev.recv_array(Kind.TENSOR)  # [T, D]
        waited = clock.now() - t0
        t.comm_s += waited
        if t.trace:
            t.events.append(TraceEvent("wait", "comm", t0, waited))
        x = dev.layers(x, int(positions[0]))
        t1 = clock.now()
        _send_on(group, nxt, positions, x)
        t.comm_s += clock.now() - t1
    return dev.report(r)


class PipelineMaster:
    """Rank 0: embedding, the first stage's layers, and the LM head."""

    def __init__(self, group: Group, dev: Device) -> None:
        self.group, self.dev = group, dev

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        dev, n = self.dev, self.group.world_size
        x = dev.layers(dev.embed(ids), pos)  # [T] -> [T, D] through stage 0
        if n > 1:
            t0 = dev.clock.now()
            _send_on(self.group, 1, np.arange(pos, pos + len(ids), dtype=np.int64), x)
            last = self.group.channel(n - 1)
            last.recv_array(Kind.TENSOR)  # positions echo
            x = last.recv_array(Kind.TENSOR)
            dev.timers.comm_s += dev.clock.now() - t0  # includes the other stages' compute (they run in turn)
        return dev.head(x if all_logits else x[-1:])

    def collect(self) -> list[RankReport]:
        """Every stage's report so far: the request travels down the pipeline; each stage answers here."""
        n = self.group.world_size
        if n > 1:
            self.group.channel(1).send_json(Kind.CONTROL, {"op": "report"})
        reports = [self.dev.report(0)]
        for r in range(1, n):
            ch = self.group.channel(r)
            reports.append(RankReport.from_json(ch.recv_json(Kind.CONTROL), ch.peer))
        return reports

    def finish(self) -> None:
        if self.group.world_size > 1:  # the stop travels down the pipeline like a step
            self.group.channel(1).send_json(Kind.CONTROL, {"op": "stop"})


def _local_stage_main(rank: int, addr: str, model_dir: str, world_size: int, layers: range, max_seq: int,
                      secret: bytes, fingerprint: str, timeout_s: float) -> None:
    set_blas_threads(1)
    try:
        store = TensorStore.from_model_dir(model_dir)
        group = Group.worker(rank, addr, world_size=world_size, secret=secret, fingerprint=fingerprint,
                             timeout_s=timeout_s)
        try:
            stage_loop(group, make_stage(store, layers, max_seq))
        finally:
            group.close()
    except TpiError as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        os._exit(2)
    os._exit(0)


def run_local(model_dir: str, world_size: int, prompt_ids: list[int], max_new_tokens: int,
              ratios: list[float] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, keep_logits: bool = False):
    """Generate with a local pipeline of `world_size` processes (tests and benchmarks)."""
    store = TensorStore.from_model_dir(model_dir)
    store.check()
    stages = plan_stages(store.cfg.num_hidden_layers, world_size, ratios)
    max_seq = len(prompt_ids) + max_new_tokens
    secret, fp = secrets.token_bytes(32), "pipeline:" + os.path.abspath(model_dir)
    listener = open_listener("127.0.0.1", 0)
    addr = "127.0.0.1:%d" % listener.getsockname()[1]
    workers = LocalWorkers()
    group = None
    try:
        workers.start(_local_stage_main, {r: (r, addr, model_dir, world_size, stages[r], max_seq, secret, fp, timeout_s)
                                          for r in range(1, world_size)})
        group = Group.master(world_size, secret=secret, fingerprint=fp, timeout_s=timeout_s, listener=listener,
                             mesh=True)
        master = PipelineMaster(group, make_stage(store, stages[0], max_seq))
        gen = generate(master.step, prompt_ids, max_new_tokens, max_seq=max_seq, keep_logits=keep_logits)
        master.finish()
        return gen
    finally:
        if group is not None:
            group.close()
        workers.close()
