"""Tensor-parallel runtime: a master (rank 0) and N-1 workers running one model split N ways.

Owns the per-step protocol between devices and the life cycle of local worker processes:
  master: embed ids -> run the K private layers alone (`--private-layers K`, default 0) -> broadcast
          positions [T] and hidden states [T, D] after layer K -> every rank runs layers K.. on its shard
          with the collective as `allreduce` -> master: final norm + LM head -> sample.
  Token ids and text never leave the master; workers receive only positions, hidden states after layer
  K (with K = 0: the embedding rows, which a lookup in the public table inverts) and small control
  messages (setup/stop/report), all over tpicore.comm's framed transport. With K = all layers the
  workers are sent no step at all. Opt-in `--split-head` (split_head.py) also gives each worker its
  vocabulary slice of the LM head and has it return that slice's logits every step.
Local workers are started with `multiprocess` (fork) and always reaped. Layer: dist. A rank's options
(`RunOptions`) are validated where they arrive; its report is a tpicore.runtime.report.RankReport.
Emulation (a virtual clock, a modelled disk, a link shaper) comes in as one DeviceEnv. Must not contain
model math (tpicore.model) or wire-format details (tpicore.comm).
"""

from __future__ import annotations

import os
import signal
import socket

import numpy as np
from threadpoolctl import threadpool_limits

from tpicore.comm import collectives as C
from tpicore.comm.channel import (
    ControlMessage,
    PeerLost,
    PeerTimeout,
)
from tpicore.comm.frame import CommError, Kind, ProtocolError, parse_json
from tpicore.comm.group import Group
from tpicore.comm.lobby import join_lobby
from tpicore.dist import split_head
from tpicore.dist.failover import (
    MasterLost,
    Member,
    Regroup,
    Stopped,
    as_regroup,
    await_regroup,
    next_control,
    rejoin,
)
from tpicore.dist.local_workers import report_failure
from tpicore.dist.split_head import HeadSlice
from tpicore.errors import TpiError
from tpicore.runtime.device import Device
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.report import RankReport, TimeSplit
from tpicore.runtime.session import make_source
from tpicore.schema import Choice, Flag, Int, OptInt, Record, load
from tpicore.weights.store import TensorStore

# With failover a worker waits this many timeouts for the master mid-step: the master itself takes up to one
# timeout to declare a silent peer lost, then regroups. A master that is gone (EOF) is noticed at once.
MASTER_GRACE = 2.0


class RunOptions(Record):
    """What every rank must agree on for one run: sent by the master in its setup message and validated
    by each worker on arrival (unknown keys, wrong types and out-of-range values are refused)."""

    max_seq: Int(1) = 2048  # positions the KV caches hold (a worker also bounds it by the model's context)
    allreduce: Choice(*C.ALGOS) = "star"
    window: OptInt(2) = None  # sliding window of resident blocks; None: every block resident
    retain_every: Int(0) = 0
    trace: Flag = False
    drop_cache: Flag = True  # the window drops the page cache behind its reads; False: warm re-reads (the
                             # emulator with a modelled disk on a virtual clock: same times, less real time)
    split_head: Flag = False  # --split-head: each rank computes its vocabulary slice's logits (split_head.py)
    failover: Flag = False  # a failed collective keeps the channels open: the master regroups (failover.py)
    dequantize_at_load: Flag = False  # --dequantize-at-load: ggml weights as float32 when loaded (else kept quantized)

    def to_json(self) -> dict:
        return self.model_dump()


def set_blas_threads(n: int) -> None:
    """Limit BLAS threads in this process (N device processes on few cores must not oversubscribe)."""
    threadpool_limits(limits=max(1, n), user_api="blas")


def make_device(store: TensorStore, opts: RunOptions, allreduce, env: DeviceEnv) -> Device:
    """This rank's Device: the window scheduler (with env's clock and disk model, which charge each
    load on the loader's own timeline) when opts asks for one, else resident weights."""
    idle = store.layout.rank != 0 and not store.layout.shared_layers(store.cfg.num_hidden_layers)
    window = None if idle else opts.window  # a worker holding no layer (all private) has nothing to stream
    source = make_source(store, window, opts.retain_every, env, opts.drop_cache, opts.dequantize_at_load)
    dev = Device(store, source, opts.max_seq, allreduce, env.clock)
    dev.timers.trace = opts.trace
    return dev


# ------------------------------------------------------------------------------------------------
# worker side


def worker_loop(group: Group, store: TensorStore, env: DeviceEnv) -> RankReport:
    """Serve steps until the master says stop; returns this rank's report (also sent to the master).
    A "report" control message is answered with the report so far, and serving goes on. With failover
    (the master's setup says so), the master's regroup raises failover.Regroup, and a failed mesh peer is
    reported to the master before waiting for its regroup; losing the master raises MasterLost."""
    try:
        return _serve(group, store, env)
    except ControlMessage as e:
        raise as_regroup(e, "rank 0") from None
    except (PeerLost, PeerTimeout) as e:
        if not group.keep_on_failure:
            raise
        if e.peer_rank in (None, 0):
            raise MasterLost(f"rank {group.rank}: lost the master ({e})") from None
        try:  # the master may be waiting on another rank: tell it who failed, then wait for its regroup
            group.channel(0).send_json(Kind.CONTROL, {"op": "peer_lost", "rank": e.peer_rank, "why": str(e)})
        except CommError as e2:
            raise MasterLost(f"rank {group.rank}: lost the master ({e2})") from None
        raise await_regroup(group.channel(0)) from None


def _serve(group: Group, store: TensorStore, env: DeviceEnv) -> RankReport:
    master = group.channel(0)
    setup = next_control(master)
    if setup.get("op") != "setup":
        raise TpiError(f"rank {group.rank}: expected a setup message from the master, got {setup.get('op')!r}")
    opts = load(RunOptions, setup.get("options"), f"rank {group.rank}: setup from {master.peer}: options")
    limit = store.cfg.max_position_embeddings + 1  # prompt + new tokens - 1 positions are ever fed
    if opts.max_seq > limit:
        raise TpiError(f"rank {group.rank}: setup from {master.peer}: options.max_seq: must be <= {limit} "
                       f"(max_position_embeddings + 1), got {opts.max_seq}")
    group.keep_on_failure = opts.failover
    if opts.failover:  # the master may wait a whole timeout on a lost peer before it regroups: grant it that
        master.set_timeout(MASTER_GRACE * group.timeout_s)
    dev = make_device(store, opts, C.Collective(group, opts.allreduce), env)
    try:
        head = HeadSlice.receive(master, store.cfg, group.rank, group.world_size) if opts.split_head else None
        while True:
            hdr, payload = master.recv_any((Kind.CONTROL, Kind.TENSOR))
            if hdr.kind == Kind.CONTROL:
                op = parse_json(payload, master.peer).get("op")
                if op == "stop":
                    break
                if op == "report":  # between generations (the emulator's per-run split)
                    master.send_json(Kind.CONTROL, {"op": "report", **dev.report(group.rank).to_json()})
                    continue
                if op == "ping":  # the master's heartbeat while idle
                    master.send_json(Kind.CONTROL, {"op": "pong"})
                    continue
                if op == "regroup":
                    raise as_regroup(ControlMessage(parse_json(payload, master.peer), "a step", master.peer),
                                     master.peer)
                raise TpiError(f"rank {group.rank}: unexpected control message {op!r} from the master")
            if not dev.layer_ids:
                raise TpiError(f"rank {group.rank}: a step from the master, but every layer is private to it")
            positions = payload.reshape(-1)  # [T] int64: positions only, never token ids
            x = C.broadcast(group, None, root=0)  # [T, D] hidden states
            x = dev.layers(x, int(positions[0]))
            if head is not None:  # --split-head: this slice's logits at the last position
                master.send_array(Kind.TENSOR, split_head.timed(dev, head, x))
        report = dev.report(group.rank)
        master.send_json(Kind.CONTROL, {"op": "report", **report.to_json()})
        return report
    finally:
        dev.close()


def run_worker(rank: int, master_addr: str, shard_dir: str | None, secret: bytes | None, timeout_s: float,
               blas_threads: int | None = None, env: DeviceEnv | None = None, *, model: str | None = None,
               spare: bool = False) -> RankReport | None:
    """Join the master at `master_addr` as `rank` with the shard in `shard_dir`, and serve until stopped;
    a spare (`rank` is then its member id) waits in the master's lobby until it is given a rank. Each
    regroup of the master gives this process a new rank and slice (from `model`, its own copy of the
    checkpoint, when it has one). env: this device's clock, disk model and link hook (default: the real
    world). Returns the last report (None: a spare the master never needed)."""
    env = env or DeviceEnv()
    if blas_threads:
        set_blas_threads(blas_threads)
    member = Member(model, secret, timeout_s)
    store = None
    if spare:
        group = join_lobby(master_addr, rank, secret=secret, timeout_s=timeout_s)
    else:
        store = TensorStore.from_shard_dir(shard_dir)
        if store.layout.rank != rank:
            raise TpiError(f"{shard_dir}: holds the shard of rank {store.layout.rank}, not rank {rank}")
        store.check()
        group = Group.worker(rank, master_addr, world_size=store.layout.world_size, secret=secret,
                             fingerprint=store.fingerprint, timeout_s=timeout_s)
    group.link_hook = env.link_hook
    try:
        while True:
            try:
                if store is None:
                    raise await_regroup(group.channel(0), "standing by")
                return worker_loop(group, store, env)
            except Regroup as r:
                master = group.channel(0)
                for peer in [p for p in group.channels if p != 0]:
                    group.channels.pop(peer).close(bye=False)
                group, store = rejoin(master, member, r.epoch, store, env.link_hook)
    except Stopped:
        return None
    finally:
        group.close()


def local_worker_main(rank: int, master_addr: str, shard_dir: str | None, secret: bytes, timeout_s: float,
                       blas_threads: int, model: str | None = None, spare: bool = False) -> None:
    """Entry of a locally spawned worker process: an error is one line (to the master while the group
    forms, which prints it and ends the run at once; to stderr after), exit code 2."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master handles Ctrl-C and reaps us
    try:
        run_worker(rank, master_addr, shard_dir, secret, timeout_s, blas_threads, model=model, spare=spare)
    except TpiError as e:
        report_failure(f"rank {rank}: {e}")
        os._exit(2)
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# master side


class Master:
    """Rank 0: owns the group, its own shard, the embedding and the LM head. env: this device's clock,
    disk model and link hook (default: the real world; a link hook, if any, is installed on the group)."""

    def __init__(self, group: Group, store: TensorStore, opts: RunOptions, env: DeviceEnv | None = None) -> None:
        env = env or DeviceEnv()
        self.group, self.store, self.opts = group, store, opts
        self.cfg = store.cfg
        if env.link_hook is not None:
            group.link_hook = env.link_hook
        group.keep_on_failure = opts.failover
        if opts.split_head:
            split_head.check_split_head(opts.window, len(store.layout.shared_layers(self.cfg.num_hidden_layers)))
        for r in range(1, group.world_size):
            group.channel(r).send_json(Kind.CONTROL, {"op": "setup", "options": opts.to_json()})
        self.device = make_device(store, opts, C.Collective(group, opts.allreduce), env)
        self.head = self._split_head() if opts.split_head else None
        self.step_times: list[TimeSplit] = []
        self.reports: list[RankReport] = []

    def _split_head(self) -> HeadSlice:
        """--split-head: send each worker its head rows and the final norm; keep rank 0's slice."""
        w = self.device.source.acquire(("post", -1))  # resident: {"norm": [D], "lm_head": [V, D]}
        ranges = split_head.vocab_ranges(self.cfg.vocab_size, self.group.world_size)
        for r in range(1, self.group.world_size):
            split_head.send_head(self.group.channel(r), w["norm"], w["lm_head"][ranges[r][0]:ranges[r][1]])
        head = HeadSlice(self.cfg, w["norm"], w["lm_head"][ranges[0][0]:ranges[0][1]], ranges[0][0])
        self.device.source.release(("post", -1))
        return head

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """ids [T] -> logits [T or 1, V]; only positions and hidden states after the private layers go
        to the workers (nothing at all when every layer is private)."""
        dev, t = self.device, self.device.timers
        before = t.snapshot()
        x = dev.embed(ids)  # [T] -> [T, D]
        shared = self.store.layout.shared_layers(self.cfg.num_hidden_layers)
        x = dev.layers(x, pos, range(shared.start))  # private layers 0..K-1, here alone: [T, D] -> [T, D]
        if shared:
            positions = np.arange(pos, pos + len(ids), dtype=np.int64)  # [T]
            t0 = dev.clock.now()
            for r in range(1, self.group.world_size):  # broadcast positions, then hidden states
                self.group.channel(r).send_array(Kind.TENSOR, positions)
            C.broadcast(self.group, x, root=0)
            t.comm_s += dev.clock.now() - t0
            x = dev.layers(x, pos, shared)
        if self.head is not None and shared:  # every rank's vocabulary slice, gathered here
            logits = split_head.gather_logits(dev, self.head, [self.group.channel(r) for r in
                                                               range(1, self.group.world_size)], x)
            if all_logits and len(ids) > 1:  # every position's logits: the master's own whole head
                logits = dev.head(x)
        else:
            logits = dev.head(x if all_logits else x[-1:])
        self.step_times.append(t.snapshot() - before)
        return logits

    def heartbeat(self) -> None:
        """Ping every worker and wait for each answer (within the timeout): a hung device is found while
        idle too, and the workers' own silence timers restart."""
        for r in range(1, self.group.world_size):
            self.group.channel(r).send_json(Kind.CONTROL, {"op": "ping"})
        for r in range(1, self.group.world_size):
            ch = self.group.channel(r)
            if ch.recv_json(Kind.CONTROL).get("op") != "pong":
                raise ProtocolError(f"{ch.peer} answered a ping with something else")

    def finish(self) -> list[RankReport]:
        """Stop the workers and collect their reports (peak RSS, time split, window, trace events)."""
        self.reports = self._gather("stop")
        return self.reports

    def collect(self) -> list[RankReport]:
        """Every rank's report so far, the workers still serving (totals: RankReport.since for one run)."""
        return self._gather("report")

    def _gather(self, op: str) -> list[RankReport]:
        for r in range(1, self.group.world_size):
            self.group.channel(r).send_json(Kind.CONTROL, {"op": op})
        reports = [self.device.report(0)]
        for r in range(1, self.group.world_size):
            ch = self.group.channel(r)
            reports.append(RankReport.from_json(ch.recv_json(Kind.CONTROL), ch.peer))
        return reports

    def close(self) -> None:
        self.device.close()


def stop_listening(listener: socket.socket) -> None:
    """Wake and end a rendezvous waiting on `listener` (its accept fails at once)."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def read_secret(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise TpiError(f"--secret-file: cannot read {path} ({e.strerror})") from None
    if len(secret) < 16:
        raise TpiError(f"--secret-file: {path} holds {len(secret)} bytes; use at least 16 random bytes")
    return secret
