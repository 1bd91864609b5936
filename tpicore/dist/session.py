"""`tpi generate --devices N` and `tpi serve`'s device group: the master here, workers spawned locally or
joining over TCP, with failover on by default.

Layer: dist (the top of it). Owns turning GenerateOptions into a running group: where the shards come from
(the cache, --shards, --listen), spawning and reaping local workers and standby spares, the lobby for
devices that join later, the placement for fewer devices after a loss, and the session's report. Steps
and the per-step protocol are tensor_parallel.Master's; recovery is elastic.ElasticMaster's. Must not
contain model math or wire-format details.
"""

from __future__ import annotations

import os
import secrets
import time

import numpy as np

from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.endpoint import is_loopback, open_listener
from tpicore.comm.frame import CommError, Kind
from tpicore.comm.group import Group
from tpicore.comm.lobby import Lobby
from tpicore.dist.elastic import ElasticMaster, keep_shares
from tpicore.dist.failover import Recovery, SliceSource
from tpicore.dist.local_workers import LocalWorkers
from tpicore.dist.tensor_parallel import (
    Master,
    RunOptions,
    local_worker_main,
    read_secret,
    set_blas_threads,
    stop_listening,
)
from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import balanced_ratios, check_private_layers, parse_ratios
from tpicore.runtime.generate import Sampling, generate
from tpicore.runtime.session import GenerateOptions, write_trace
from tpicore.tools.shard import cached_shards
from tpicore.weights.gguf import GGUFCheckpoint, is_gguf_path
from tpicore.weights.store import TensorStore

# --ratios when not given (see plan_ratios). "equal", not "balanced": every block ends in an allreduce (a
# barrier), so a step costs the sum over blocks of the slowest rank plus the master's LM head; equal shares
# minimise that sum, and giving the master fewer columns only moves them onto the workers' critical path
# (125M model, N = 2: 249 MB of weights on the critical path with equal shares, 298 MB balanced).
DEFAULT_PLACEMENT = "equal"


def plan_ratios(opts: GenerateOptions) -> list[float]:
    """--ratios: numbers as given, 'equal', or 'balanced' (model.split.balanced_ratios: the master, which
    also runs the LM head, gets fewer heads and FFN columns); not given: DEFAULT_PLACEMENT."""
    n = opts.devices
    text = (opts.ratios or DEFAULT_PLACEMENT).strip()
    if text != "balanced":
        return parse_ratios(text, n)
    if not opts.model or not os.path.exists(opts.model):  # a missing model: cached_shards says so
        return parse_ratios(None, n)
    cfg = GGUFCheckpoint(opts.model).cfg if is_gguf_path(opts.model) else ModelConfig.from_dir(opts.model)
    return balanced_ratios(cfg, n, opts.private_layers or 0)


def shard_dirs_for(opts: GenerateOptions) -> list[str]:
    n = opts.devices
    if opts.shards:
        dirs = [os.path.join(opts.shards, f"rank-{r}") for r in range(n)]
        if not os.path.isdir(dirs[0]):
            raise TpiError(f"--shards: {dirs[0]} not found (expected the output folder of `tpi shard`)")
        return dirs
    return cached_shards(opts.model, n, plan_ratios(opts), private_layers=opts.private_layers or 0)


class ParallelSession:
    """`tpi generate --devices N`: the master here, workers spawned locally or joining over TCP."""

    def __init__(self, opts: GenerateOptions) -> None:
        self.opts = opts
        n = opts.devices
        if n < 1:
            raise TpiError(f"--devices: expected >= 1, got {n}")
        if opts.private_layers is not None and opts.model and os.path.isdir(opts.model):  # before any sharding
            check_private_layers(opts.private_layers, ModelConfig.from_dir(opts.model))
        self.dirs = shard_dirs_for(opts) if not opts.listen else None
        if self.dirs:
            master_dir = self.dirs[0]
        elif opts.shards:
            master_dir = os.path.join(opts.shards, "rank-0")
        else:  # --listen with --model: this host shards (cached) and serves rank 0
            master_dir = cached_shards(opts.model, n, plan_ratios(opts),
                                       private_layers=opts.private_layers or 0)[0]
        self.store = TensorStore.from_shard_dir(master_dir)
        if self.store.layout.world_size != n:
            raise TpiError(f"{master_dir}: shards are for {self.store.layout.world_size} devices, not --devices {n}")
        k = self.store.layout.private_layers
        if opts.private_layers is not None and opts.private_layers != k:
            raise TpiError(f"{master_dir}: shards were written with --private-layers {k}, not {opts.private_layers} "
                           "(re-run tpi shard with --private-layers, or leave the flag out)")
        self.store.check()
        self.cfg = self.store.cfg
        self.tokenizer_dir = master_dir
        self.workers = LocalWorkers()
        self.master: Master | ElasticMaster | None = None
        self._group: Group | None = None
        self.failover = opts.failover and n > 1
        self.lobby: Lobby | None = None

    @classmethod
    def open(cls, opts: GenerateOptions) -> "ParallelSession":
        return cls(opts)

    def __enter__(self) -> "ParallelSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def prepare(self, max_seq: int) -> None:
        o, n = self.opts, self.opts.devices
        if o.listen:
            host, _, port = o.listen.rpartition(":")
            if not host or not port.isdigit():
                raise TpiError(f"--listen: expected HOST:PORT, got {o.listen!r}")
            secret = read_secret(o.secret_file)
            if not is_loopback(host) and secret is None:
                raise TpiError("--listen on a non-loopback address needs --secret-file (workers must authenticate)")
            listener = open_listener(host, int(port))
        else:
            secret = secrets.token_bytes(32)
            listener = open_listener("127.0.0.1", 0)
            addr = "127.0.0.1:%d" % listener.getsockname()[1]
            blas = max(1, (os.cpu_count() or 1) // n)
            set_blas_threads(blas)
            copy = o.model if self.failover else None  # on this host every worker can re-shard the model
            spares = o.spares if self.failover else 0
            self.workers.start(local_worker_main, {
                **{r: (r, addr, self.dirs[r], secret, o.timeout_s, blas, copy) for r in range(1, n)},
                **{r: (r, addr, None, secret, o.timeout_s, blas, copy, True) for r in range(n, n + spares)}})
            self.workers.watch(lambda: stop_listening(listener))  # a worker failing at start-up ends the wait
        try:
            self._group = Group.master(n, secret=secret, fingerprint=self.store.fingerprint, timeout_s=o.timeout_s,
                                      listener=listener, mesh=o.allreduce != "star", keep_listener=self.failover)
        except TpiError as e:
            failure = self.workers.startup_failure() if self.workers.procs else None
            if failure:  # the worker's own line, naming its rank: the cause, not the master's wait
                raise TpiError(failure) from None
            dead = self.workers.dead()
            if dead:
                raise TpiError(f"rank {dead[0][0]} exited with code {dead[0][1]} before joining ({e})") from None
            raise
        self.workers.formed()
        if self.failover:  # spares and devices coming back join here from now on
            self.lobby = Lobby(listener, secret=secret, timeout_s=o.timeout_s)
            if not o.listen and o.spares:
                self._await_spares(o.spares, o.timeout_s)
        opts = RunOptions(max_seq=max_seq, allreduce=o.allreduce, window=o.window, retain_every=o.retain_every,
                          trace=o.trace, split_head=o.split_head, failover=self.failover,
                          dequantize_at_load=o.dequantize_at_load)
        if not self.failover:
            self.master = Master(self._group, self.store, opts)
            return
        ratios = tuple(plan_ratios(o)) if not o.shards else tuple(parse_ratios(None, n))
        slices = SliceSource(o.model, o.shards, (n, ratios), self.store.layout.private_layers)
        self.master = ElasticMaster(self._group, self.store, opts, lobby=self.lobby, slices=slices, ratios=ratios,
                                    placement=self.placement, target_world=n)

    def _await_spares(self, count: int, timeout_s: float) -> None:
        """--spares S: the local standby devices are in the lobby before the first step (a loss right away
        finds them), or one error line."""
        deadline = time.monotonic() + timeout_s
        while self.lobby.waiting() < count:
            if time.monotonic() > deadline or self.workers.dead():
                raise TpiError(f"--spares: {self.lobby.waiting()} of {count} standby devices joined within "
                               f"{timeout_s:.1f} s")
            time.sleep(0.01)

    @property
    def group(self) -> Group | None:
        """The device group now (a new one after each recovery)."""
        return self.master.group if self.master is not None else self._group

    @property
    def recoveries(self) -> list[Recovery]:
        return self.master.recoveries if isinstance(self.master, ElasticMaster) else []

    @property
    def member_of(self) -> dict[int, int]:
        """Current rank -> the member id of the worker holding it (its first rank, or a spare's id)."""
        if isinstance(self.master, ElasticMaster):
            return self.master.member_of
        return {r: r for r in range(self.opts.devices)}

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """ids [T] at positions pos.. -> logits; with failover, a lost device is replaced or split away, the
        history replayed, and the step run again on the new group (one note line on stderr)."""
        return self.master.step(ids, pos, all_logits)

    def heartbeat(self) -> None:
        """Between requests: ping every device, so idle workers' silence timers do not run out (failover: a
        lost one is recovered now; without it, the error ends the group)."""
        if self.master is not None:
            self.master.heartbeat()

    def grow(self) -> None:
        """At a request boundary: admit standby devices while the group is smaller than --devices."""
        if isinstance(self.master, ElasticMaster):
            self.master.grow()

    def placement(self, kept: list[int], ratios: tuple[float, ...]) -> tuple[float, ...]:
        """Ratios for the master + `kept` (current ranks; -1: a standby device): as the user asked, over
        fewer devices (numbers given: the survivors keep theirs, a standby device gets the mean)."""
        n = 1 + len(kept)
        text = (self.opts.ratios or DEFAULT_PLACEMENT).strip()
        if self.opts.shards or text == "equal":
            return tuple(parse_ratios(None, n))
        if text == "balanced":
            return tuple(balanced_ratios(self.cfg, n, self.store.layout.private_layers))
        return keep_shares(kept, ratios)

    def report(self) -> dict:
        """The `tpi generate --json` fields of N devices: per rank and per token time splits."""
        reports = self.master.finish()
        return {
            "devices": self.opts.devices, "allreduce": self.opts.allreduce,
            "per_rank": [{"rank": r.rank, "peak_rss_bytes": r.peak_rss_bytes, "page_cache_bytes": r.page_cache_bytes,
                          **r.time_split.to_json(), "window": r.window.to_json() if r.window is not None else {}}
                         for r in reports],
            "per_token": [s.to_json() for s in self.master.step_times],
            "recoveries": [r.to_json() for r in self.recoveries],
        }

    def write_trace(self, path: str) -> None:
        reports = self.master.reports or self.master.finish()
        per_rank = {r.rank: r.trace for r in reports}
        starts = [e.start_s for r in reports for e in r.trace]
        write_trace(path, per_rank, min(starts) if starts else 0.0)

    def close(self, failed: bool = False) -> None:
        try:
            if self.lobby is not None:  # standby devices: the session is over
                for ch in self.lobby.take():
                    try:
                        ch.send_json(Kind.CONTROL, {"op": "stop"})
                    except CommError:
                        pass
                    ch.close()
                self.lobby.close()
            if self.master is not None:
                if not failed and not self.master.reports:
                    try:
                        self.master.finish()
                    except TpiError:
                        pass
                self.master.close()
        finally:
            for g in {id(g): g for g in (self._group, self.group) if g is not None}.values():
                g.close()
            self.workers.close(grace_s=0.5 if failed else 5.0)


# ------------------------------------------------------------------------------------------------
# programmatic use (tests, benchmarks, the emulator)


def run_local(world_size: int, prompt_ids: list[int], max_new_tokens: int, *, model: str | None = None,
              shards: str | None = None, ratios: str | None = None, allreduce: str = "star",
              window: int | None = None, retain_every: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
              keep_logits: bool = False, sampling: Sampling | None = None, private_layers: int | None = None,
              split_head: bool = False):
    """Generate with `world_size` local processes; returns (Generation, session report)."""
    opts = GenerateOptions(model=model, shards=shards, devices=world_size, ratios=ratios, allreduce=allreduce,
                           timeout_s=timeout_s, window=window, retain_every=retain_every,
                           private_layers=private_layers, split_head=split_head)
    max_seq = len(prompt_ids) + max_new_tokens
    with ParallelSession(opts) as s:
        s.prepare(max_seq=max_seq)
        gen = generate(s.step, prompt_ids, max_new_tokens, sampling or Sampling(), (), max_seq, keep_logits=keep_logits)
        return gen, s.report()
