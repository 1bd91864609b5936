"""Tensor-parallel runtime: a master (rank 0) and N-1 workers running one model split N ways.

Owns the per-step protocol between devices and the life cycle of local worker processes:
  master: embed ids -> broadcast positions [T] and hidden states [T, D] -> every rank runs all layers
          on its shard with the collective as `allreduce` -> master: final norm + LM head -> sample.
  Token ids and text never leave the master; workers receive only positions, hidden states and
  small control messages (setup/stop/report), all over tpicore.comm's framed transport.
Local workers are started with `multiprocess` (fork) and always reaped. Must not contain model
math (tpicore.model) or wire-format details (tpicore.comm).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tpicore.comm import collectives as C
from tpicore.comm.transport import Group, open_listener
from tpicore.comm.wire import Kind, parse_json
from tpicore.runtime.device import Device, Timers
from tpicore.weights.store import TensorStore
from tpicore.errors import TpiError
from tpicore.model.split import parse_ratios
from tpicore.runtime.generate import Sampling, generate
from tpicore.runtime.session import make_source
from tpicore.runtime.session import write_trace
from tpicore.tools.shard import cached_shards

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class RunOptions:
    """What every rank must agree on for one run (sent by the master to each worker at setup)."""

    max_seq: int = 2048
    allreduce: str = "star"
    window: int | None = None
    retain_every: int = 0
    trace: bool = False
    read_delay_s: float = 0.0  # test hook: artificially slow disk
    drop_cache: bool = True  # the window drops the page cache behind its reads; False: warm re-reads (the
                             # emulator with a modelled disk on a virtual clock: same times, less real time)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def set_blas_threads(n: int) -> None:
    """Limit BLAS threads in this process (N device processes on few cores must not oversubscribe)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=max(1, n), user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass


def make_device(store: TensorStore, opts: RunOptions, allreduce, clock=None,
                disk_read_mbps: float | None = None) -> Device:
    """This rank's Device. `clock` and `disk_read_mbps` (the emulated device's disk, megabits/s) come
    from the emulator: with a window, a virtual clock or a modelled disk are handed to the scheduler
    (`WindowSource(clock=, disk_read_mbps=)`), which charges each load bytes / bandwidth on the loader's
    own timeline. Without them the scheduler reads at the host's speed in real time. `opts.drop_cache`
    is passed to the scheduler as is."""

    if opts.window:
        disk = {}
        if disk_read_mbps is not None or getattr(clock, "virtual", False):
            disk = {"clock": clock, "disk_read_mbps": disk_read_mbps}
        source = make_source(store, opts.window, opts.retain_every, read_delay_s=opts.read_delay_s,
                             drop_cache=opts.drop_cache, **disk)
    else:
        source = make_source(store, None)
    dev = Device(store, source, opts.max_seq, allreduce, clock)
    dev.timers.trace = opts.trace
    return dev


# ------------------------------------------------------------------------------------------------
# worker side


def rank_report(rank: int, dev: Device, opts: RunOptions) -> dict:
    """What a rank tells the master: peak RSS, time split totals, trace events."""
    return {"rank": rank, **dev.report(), "events": dev.timers.events if opts.trace else []}


def worker_loop(group: Group, store: TensorStore, clock=None, disk_read_mbps: float | None = None) -> dict:
    """Serve steps until the master says stop; returns this rank's report (also sent to the master).
    A "report" control message is answered with the report so far, and serving goes on."""
    master = group.channel(0)
    setup = master.recv_json(Kind.CONTROL)
    if setup.get("op") != "setup":
        raise TpiError(f"rank {group.rank}: expected a setup message from the master, got {setup.get('op')!r}")
    opts = RunOptions(**setup["options"])
    dev = make_device(store, opts, C.Collective(group, opts.allreduce), clock, disk_read_mbps)
    try:
        while True:
            hdr, payload = master.recv_any((Kind.CONTROL, Kind.TENSOR))
            if hdr.kind == Kind.CONTROL:
                op = parse_json(payload, master.peer).get("op")
                if op == "stop":
                    break
                if op == "report":  # between generations (the emulator's per-run split)
                    master.send_json(Kind.CONTROL, {"op": "report", **rank_report(group.rank, dev, opts)})
                    continue
                raise TpiError(f"rank {group.rank}: unexpected control message {op!r} from the master")
            positions = payload.reshape(-1)  # [T] int64: positions only, never token ids
            x = C.broadcast(group, None, root=0)  # [T, D] hidden states
            dev.layers(x, int(positions[0]))
        report = rank_report(group.rank, dev, opts)
        master.send_json(Kind.CONTROL, {"op": "report", **report})
        return report
    finally:
        dev.close()


def run_worker(rank: int, master_addr: str, shard_dir: str, secret: bytes | None, timeout_s: float,
               blas_threads: int | None = None, link_hook=None, clock=None,
               disk_read_mbps: float | None = None) -> dict:
    if blas_threads:
        set_blas_threads(blas_threads)
    store = TensorStore.from_shard_dir(shard_dir)
    if store.layout.rank != rank:
        raise TpiError(f"{shard_dir}: holds the shard of rank {store.layout.rank}, not rank {rank}")
    store.check()
    group = Group.worker(rank, master_addr, world_size=store.layout.world_size, secret=secret,
                         fingerprint=store.fingerprint, timeout_s=timeout_s)
    if link_hook is not None:
        group.link_hook = link_hook
    try:
        return worker_loop(group, store, clock, disk_read_mbps)
    finally:
        group.close()


def _local_worker_main(rank: int, master_addr: str, shard_dir: str, secret: bytes, timeout_s: float,
                       blas_threads: int) -> None:
    """Entry of a locally spawned worker process: errors go to stderr as one line, exit code 2."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master handles Ctrl-C and reaps us
    try:
        run_worker(rank, master_addr, shard_dir, secret, timeout_s, blas_threads)
    except TpiError as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        os._exit(2)
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# master side


class LocalWorkers:
    """N-1 worker processes on this host; terminated and reaped on close, whatever happened."""

    def __init__(self) -> None:
        self.procs: list = []

    def start(self, target, args_per_rank: dict[int, tuple]) -> None:
        import multiprocess as mp

        ctx = mp.get_context("fork")
        for rank, args in args_per_rank.items():
            p = ctx.Process(target=target, args=args, name=f"tpi-rank-{rank}", daemon=True)
            p.start()
            self.procs.append(p)

    def dead(self) -> list[tuple[int, int]]:
        return [(int(p.name.rsplit("-", 1)[1]), p.exitcode) for p in self.procs if p.exitcode not in (None, 0)]

    def close(self, grace_s: float = 5.0) -> None:
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)
        self.procs = []


class Master:
    """Rank 0: owns the group, its own shard, the embedding and the LM head."""

    def __init__(self, group: Group, store: TensorStore, opts: RunOptions, clock=None,
                 disk_read_mbps: float | None = None) -> None:
        self.group, self.store, self.opts = group, store, opts
        self.cfg = store.cfg
        for r in range(1, group.world_size):
            group.channel(r).send_json(Kind.CONTROL, {"op": "setup", "options": opts.to_json()})
        self.device = make_device(store, opts, C.Collective(group, opts.allreduce), clock, disk_read_mbps)
        self.step_times: list[dict[str, float]] = []
        self.reports: list[dict] = []

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """ids [T] -> logits [T or 1, V]; only positions and hidden states go to the workers."""
        dev, t = self.device, self.device.timers
        before = t.snapshot()
        x = dev.embed(ids)  # [T] -> [T, D]
        positions = np.arange(pos, pos + len(ids), dtype=np.int64)  # [T]
        t0 = dev.clock.now()
        for r in range(1, self.group.world_size):  # broadcast positions, then hidden states
            self.group.channel(r).send_array(Kind.TENSOR, positions)
        C.broadcast(self.group, x, root=0)
        t.comm_s += dev.clock.now() - t0
        x = dev.layers(x, pos)
        logits = dev.head(x if all_logits else x[-1:])
        after = t.snapshot()
        self.step_times.append({k: after[k] - before[k] for k in after})
        return logits

    def finish(self) -> list[dict]:
        """Stop the workers and collect their reports (peak RSS, time split, trace events)."""
        self.reports = self._gather("stop")
        return self.reports

    def collect(self) -> list[dict]:
        """Every rank's report so far, the workers still serving (totals: diff two for one run)."""
        return self._gather("report")

    def _gather(self, op: str) -> list[dict]:
        for r in range(1, self.group.world_size):
            self.group.channel(r).send_json(Kind.CONTROL, {"op": op})
        reports = [{**rank_report(0, self.device, self.opts), "events": self.device.timers.events}]
        for r in range(1, self.group.world_size):
            msg = self.group.channel(r).recv_json(Kind.CONTROL)
            msg.pop("op", None)
            reports.append(msg)
        return reports

    def close(self) -> None:
        self.device.close()


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


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def shard_dirs_for(args: argparse.Namespace, world_size: int) -> list[str]:
    if args.shards:
        dirs = [os.path.join(args.shards, f"rank-{r}") for r in range(world_size)]
        if not os.path.isdir(dirs[0]):
            raise TpiError(f"--shards: {dirs[0]} not found (expected the output folder of `tpi shard`)")
        return dirs

    return cached_shards(args.model, world_size, parse_ratios(args.ratios, world_size))


class ParallelSession:
    """`tpi generate --devices N`: the master here, workers spawned locally or joining over TCP."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        n = args.devices
        if n < 1:
            raise TpiError(f"--devices: expected >= 1, got {n}")
        self.timeout_s = args.timeout_s
        self.dirs = shard_dirs_for(args, n) if not args.listen else None
        master_dir = self.dirs[0] if self.dirs else os.path.join(args.shards, "rank-0") if args.shards else None
        if args.listen and not args.shards:

            master_dir = cached_shards(args.model, n, parse_ratios(args.ratios, n))[0]
        self.store = TensorStore.from_shard_dir(master_dir)
        if self.store.layout.world_size != n:
            raise TpiError(f"{master_dir}: shards are for {self.store.layout.world_size} devices, not --devices {n}")
        self.store.check()
        self.cfg = self.store.cfg
        self.tokenizer_dir = master_dir
        self.workers = LocalWorkers()
        self.master: Master | None = None
        self.group: Group | None = None

    @classmethod
    def open(cls, args: argparse.Namespace) -> "ParallelSession":
        return cls(args)

    def __enter__(self) -> "ParallelSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def prepare(self, max_seq: int) -> None:
        a, n = self.args, self.args.devices
        if a.listen:
            host, _, port = a.listen.rpartition(":")
            if not host or not port.isdigit():
                raise TpiError(f"--listen: expected HOST:PORT, got {a.listen!r}")
            secret = read_secret(a.secret_file)
            if not is_loopback(host) and secret is None:
                raise TpiError("--listen on a non-loopback address needs --secret-file (workers must authenticate)")
            listener = open_listener(host, int(port))
        else:
            secret = secrets.token_bytes(32)
            listener = open_listener("127.0.0.1", 0)
            addr = "127.0.0.1:%d" % listener.getsockname()[1]
            blas = max(1, (os.cpu_count() or 1) // n)
            set_blas_threads(blas)
            self.workers.start(_local_worker_main, {
                r: (r, addr, self.dirs[r], secret, self.timeout_s, blas) for r in range(1, n)})
        try:
            self.group = Group.master(n, secret=secret, fingerprint=self.store.fingerprint, timeout_s=self.timeout_s,
                                      listener=listener, mesh=a.allreduce != "star")
        except TpiError as e:
            dead = self.workers.dead()
            if dead:
                raise TpiError(f"rank {dead[0][0]} exited with code {dead[0][1]} before joining ({e})") from None
            raise
        opts = RunOptions(max_seq=max_seq, allreduce=a.allreduce, window=None if a.no_window else a.window,
                          retain_every=a.retain_every, trace=bool(a.trace))
        self.master = Master(self.group, self.store, opts)

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        return self.master.step(ids, pos, all_logits)

    def report(self) -> dict:
        reports = self.master.finish()
        steps = self.master.step_times
        return {
            "devices": self.args.devices, "allreduce": self.args.allreduce,
            "per_rank": [{"rank": r["rank"], "peak_rss_bytes": r["peak_rss_bytes"],
                          "page_cache_bytes": r["memory"].get("page_cache_bytes", 0), **r["timers"],
                          "window": r.get("window", {})} for r in reports],
            "per_token": steps,
        }

    def write_trace(self, path: str) -> None:

        reports = self.master.reports or self.master.finish()
        per_rank = {}
        for r in reports:
            t = Timers()
            t.events = [tuple(e) for e in r.get("events", [])]
            per_rank[r["rank"]] = t
        starts = [e[2] for t in per_rank.values() for e in t.events]
        write_trace(path, per_rank, min(starts) if starts else 0.0)

    def close(self, failed: bool = False) -> None:
        try:
            if self.master is not None:
                if not failed and not self.master.reports:
                    try:
                        self.master.finish()
                    except TpiError:
                        pass
                self.master.close()
        finally:
            if self.group is not None:
                self.group.close()
            self.workers.close(grace_s=0.5 if failed else 5.0)


# ------------------------------------------------------------------------------------------------
# `tpi worker`






# ------------------------------------------------------------------------------------------------
# programmatic use (tests, benchmarks, the emulator)


def run_local(world_size: int, prompt_ids: list[int], max_new_tokens: int, *, model: str | None = None,
              shards: str | None = None, ratios: str | None = None, allreduce: str = "star",
              window: int | None = None, retain_every: int = 0, timeout_s: float = 30.0,
              keep_logits: bool = False, sampling=None):
    """Generate with `world_size` local processes; returns (Generation, session report)."""

    args = argparse.Namespace(devices=world_size, model=model, shards=shards, ratios=ratios, allreduce=allreduce,
                              listen=None, secret_file=None, timeout_s=timeout_s, window=window,
                              no_window=window is None, retain_every=retain_every, trace=None)
    with ParallelSession(args) as s:
        s.prepare(max_seq=len(prompt_ids) + max_new_tokens)
        gen = generate(s.step, prompt_ids, max_new_tokens, sampling or Sampling(), (), len(prompt_ids) + max_new_tokens,
                       keep_logits=keep_logits)
        return gen, s.report()
