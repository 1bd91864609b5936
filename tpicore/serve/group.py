"""The device group a server keeps loaded: one session (world size 1 or N) seen through what serving needs.

Layer: serve. Owns opening a session from GenerateOptions (the same options `tpi generate` takes), its
tokenizer, the context length the KV caches are sized for, each rank's cumulative time split (for the
per-reply compute/comm/load split and /metrics), which ranks were lost when a step fails, the pids of
local device processes, and closing it all. The sessions themselves (tpicore.runtime.session.LocalSession,
tpicore.dist.session.ParallelSession) are used through their public API and left unchanged.
Must not parse HTTP, sample tokens or keep conversation state (turn.py).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass

import numpy as np

from tpicore.dist.failover import Recovery
from tpicore.dist.session import ParallelSession
from tpicore.errors import TpiError
from tpicore.runtime.report import TimeSplit
from tpicore.runtime.session import GenerateOptions, LocalSession
from tpicore.tokenizer import Tokenizer
from tpicore.weights.gguf import gguf_tokenizer, is_gguf_path

DEFAULT_CTX_TOKENS = 4096  # KV positions when --ctx-size is not given (capped by the model's own context)
_RANK_IN_MESSAGE = re.compile(r"\brank (\d+)\b")


@dataclass(frozen=True)
class DeviceSplit:
    """One rank's time over a span (one reply, or since start): seconds on that device's clock."""

    rank: int
    compute_s: float
    comm_s: float
    load_s: float
    stall_s: float

    def to_json(self) -> dict[str, float | int]:
        return {"rank": self.rank, "compute_s": self.compute_s, "comm_s": self.comm_s, "load_s": self.load_s,
                "stall_s": self.stall_s}


def split_between(before: list[TimeSplit], after: list[TimeSplit]) -> list[DeviceSplit]:
    """Per-rank time spent between two `DeviceGroup.splits()` readings."""
    out = []
    for rank, (a, b) in enumerate(zip(before, after)):
        d = b - a
        out.append(DeviceSplit(rank, d.compute_s, d.comm_s, d.load_s, d.stall_s))
    return out


@dataclass(frozen=True)
class RankProcess:
    """Where a rank runs: a local process (pid), or a remote worker (pid None)."""

    rank: int
    pid: int | None

    def to_json(self) -> dict[str, int | None]:
        return {"rank": self.rank, "pid": self.pid}


def load_tokenizer(folder: str) -> Tokenizer:
    """The tokenizer next to the weights (tokenizer.json, or a GGUF file's metadata); serving needs one."""
    if is_gguf_path(folder):
        return gguf_tokenizer(folder)
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise TpiError(f"{folder}: no tokenizer.json (serving needs the model's tokenizer)")
    return Tokenizer.from_dir(folder)


class DeviceGroup:
    """A prepared session: KV caches of `ctx_tokens` positions on every rank, weights loaded on first use."""

    def __init__(self, session: LocalSession | ParallelSession, tokenizer: Tokenizer, ctx_tokens: int,
                 devices: int) -> None:
        self.session, self.tokenizer, self.ctx_tokens, self.target_devices = session, tokenizer, ctx_tokens, devices
        cfg = session.cfg
        eos = tuple(cfg.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        self.eos_ids: tuple[int, ...] = eos
        self.vocab_size: int = cfg.vocab_size
        self.closed = False
        self._close_lock = threading.Lock()  # the engine thread and shutdown may both close

    @classmethod
    def open(cls, opts: GenerateOptions, ctx_tokens: int | None = None) -> "DeviceGroup":
        """Start the devices (local processes, or wait for remote workers with opts.listen) and size the
        KV caches: ctx_tokens, default min(DEFAULT_CTX_TOKENS, max_position_embeddings)."""
        session = LocalSession.open(opts) if opts.local else ParallelSession.open(opts)
        try:
            if session.store.note:
                print(f"note: {session.store.note}", file=sys.stderr)
            tokenizer = load_tokenizer(session.tokenizer_dir)
            limit = session.cfg.max_position_embeddings
            if ctx_tokens is not None and not 1 <= ctx_tokens <= limit:
                raise TpiError(f"--ctx-size: expected 1..{limit} (the model's max_position_embeddings), "
                               f"got {ctx_tokens}")
            ctx = ctx_tokens if ctx_tokens is not None else min(DEFAULT_CTX_TOKENS, limit)
            session.prepare(max_seq=ctx)
        except BaseException:
            session.__exit__(*sys.exc_info())
            raise
        return cls(session, tokenizer, ctx, opts.devices)

    @property
    def devices(self) -> int:
        """Devices serving now (fewer than asked for after a loss without a spare)."""
        s = self.session
        return s.group.world_size if isinstance(s, ParallelSession) and s.group is not None else self.target_devices

    def recoveries(self) -> list[Recovery]:
        """Every recovery from a lost device so far (tensor-parallel sessions with failover)."""
        return list(self.session.recoveries) if isinstance(self.session, ParallelSession) else []

    @property
    def heartbeat_s(self) -> float | None:
        """How often an idle group pings its devices (None: nothing to ping)."""
        s = self.session
        return s.opts.timeout_s / 4 if isinstance(s, ParallelSession) else None

    def heartbeat(self) -> None:
        """Idle: ping every device (a lost one is recovered now); admit standby devices up to --devices."""
        s = self.session
        if isinstance(s, ParallelSession):
            s.heartbeat()
            s.grow()

    def step(self, ids: np.ndarray, pos: int) -> np.ndarray:
        """ids [T] at positions pos..pos+T-1 -> logits [1, V] of the last one."""
        return self.session.step(ids, pos, False)

    def splits(self) -> list[TimeSplit]:
        """Every rank's cumulative time split so far (the workers keep serving)."""
        s = self.session
        if isinstance(s, ParallelSession):
            return [r.time_split for r in s.master.collect()]
        return [s.device.timers.snapshot()]

    def lost_ranks(self, err: BaseException) -> list[int]:
        """The ranks a failed step lost: local processes that died, else the worker the error names."""
        s = self.session
        if not isinstance(s, ParallelSession):
            return []
        dead = sorted(rank for rank, _ in s.workers.dead())
        if dead:
            return dead
        named = sorted({int(m) for m in _RANK_IN_MESSAGE.findall(str(err)) if 0 < int(m) < self.target_devices})
        return named

    def processes(self) -> list[RankProcess]:
        """Rank 0 is this process; local workers are child processes; remote workers have no pid here."""
        out = [RankProcess(0, os.getpid())]
        s = self.session
        if isinstance(s, ParallelSession):
            local = {int(p.name.rsplit("-", 1)[1]): p.pid for p in s.workers.procs}  # member id -> pid
            members = s.member_of  # one snapshot: a recovery (engine thread) replaces it whole
            out += [RankProcess(r, local.get(m)) for r, m in sorted(members.items()) if r > 0]
        return out

    def close(self, failed: bool = False) -> None:
        """Stop every rank and reap local processes (failed: do not wait for a clean goodbye)."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        err = TpiError("device group failed") if failed else None
        self.session.__exit__(type(err) if err else None, err, None)
