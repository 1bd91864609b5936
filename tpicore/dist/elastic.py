"""Rank 0 with failover: a tensor-parallel Master that survives a lost device.

Layer: dist (above tensor_parallel.py and failover.py, below session.py). Owns when to recover (a step or a
heartbeat failed), which ranks a failure names (`suspects`), the ratios for fewer devices, the token
history replayed into fresh KV caches, and the Recovery records. The regroup protocol itself is
failover.py's; the per-step protocol is tensor_parallel.Master's. Used by `tpi generate`/`tpi serve`
(session.ParallelSession) and the emulator's master alike. Must not spawn processes or parse flags.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np

from tpicore.comm.channel import ControlMessage, PeerLost, PeerTimeout
from tpicore.comm.frame import CommError
from tpicore.comm.group import Group
from tpicore.comm.lobby import Lobby
from tpicore.dist.failover import Recovery, SliceSource, regroup
from tpicore.dist.tensor_parallel import Master, RunOptions
from tpicore.errors import TpiError
from tpicore.runtime.env import DeviceEnv
from tpicore.runtime.report import RankReport, TimeSplit
from tpicore.weights.store import TensorStore

# ratios for the devices left: (kept current ranks, -1 for a standby device; current ratios) -> ratios
Placement = Callable[[list[int], tuple[float, ...]], tuple[float, ...]]


def keep_shares(kept: list[int], ratios: tuple[float, ...]) -> tuple[float, ...]:
    """Ratios for the master + `kept` (current ranks; -1: a standby device) when shares were given per
    device: every survivor keeps its own, a standby device gets the mean."""
    mean = sum(ratios) / len(ratios)
    return (ratios[0],) + tuple(ratios[r] if r >= 0 else mean for r in kept)


def suspects(err: CommError, mesh: bool) -> dict[int, str]:
    """The ranks a failed step names as lost (the regroup's probe finds any other)."""
    if isinstance(err, ControlMessage) and err.message.get("op") == "peer_lost":
        rank = err.message.get("rank")
        return {rank: f"reported by a peer: {err.message.get('why')}"} if type(rank) is int else {}
    if isinstance(err, PeerLost) and err.peer_rank:
        return {err.peer_rank: f"disconnected: {err}"}
    if isinstance(err, PeerTimeout) and err.peer_rank and not mesh:  # in a mesh the silent one may be
        return {err.peer_rank: f"silent: {err}"}  # waiting on the lost one: the probe decides
    return {}


class ElasticMaster:
    """A Master that regroups when a device is lost: spares take lost ranks, else the survivors re-split
    (`placement`), the history is replayed, and the failed step runs again. `on_recovery` gets each
    Recovery (default: one note line on stderr); `fits(world, ratios)` names why a split cannot run (e.g.
    a device's memory cap: the emulator), None when it can."""

    def __init__(self, group: Group, store: TensorStore, opts: RunOptions, *, lobby: Lobby | None,
                 slices: SliceSource, ratios: tuple[float, ...], placement: Placement, target_world: int,
                 env: DeviceEnv | None = None, on_recovery: Callable[[Recovery], None] | None = None,
                 fits: Callable[[int, tuple[float, ...]], str | None] | None = None) -> None:
        self.opts, self.env, self.lobby, self.slices, self.fits = opts, env, lobby, slices, fits
        self.ratios, self.placement, self.target_world = ratios, placement, target_world
        self.store = store
        self.master = Master(group, store, opts, env)
        self.recoveries: list[Recovery] = []
        self.member_of = {r: r for r in range(group.world_size)}  # current rank -> member id (first rank, or
                                                                   # a standby device's lobby id)
        self.on_recovery = on_recovery or (lambda r: print(f"note: {r.line()}", file=sys.stderr, flush=True))
        self._fed: list[int] = []  # the token ids fed so far, by position (replayed into new KV caches)
        self._epoch = 0
        self._step_times: list[TimeSplit] = []  # of the Masters before the last regroup

    @property
    def group(self) -> Group:
        return self.master.group

    @property
    def step_times(self) -> list[TimeSplit]:
        return self._step_times + self.master.step_times

    @property
    def reports(self) -> list[RankReport]:
        return self.master.reports

    def step(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """ids [T] at positions pos.. -> logits, recovering first if a device is lost on the way."""
        t0 = time.perf_counter()
        try:
            logits = self.master.step(ids, pos, all_logits)
        except CommError as e:
            self.recover(e, t0, pos)
            logits = self.master.step(ids, pos, all_logits)
        self._fed[pos:] = [int(i) for i in ids]
        return logits

    def heartbeat(self) -> None:
        """Between requests: ping every worker; a lost one is recovered from now, not at the next step."""
        t0 = time.perf_counter()
        try:
            self.master.heartbeat()
        except CommError as e:
            self.recover(e, t0, len(self._fed))

    def grow(self) -> None:
        """At a request boundary: devices waiting in the lobby (spares, devices that came back) join while the
        group is smaller than the target (a regroup with nothing lost; the history is replayed)."""
        if self.lobby is not None and self.group.world_size < self.target_world and self.lobby.waiting():
            self.recover(CommError("standby devices are waiting"), time.perf_counter(), len(self._fed))

    def recover(self, err: CommError, t_start: float, pos: int) -> None:
        """Regroup after `err` (again, if a device fails while the new group sets up or replays), then replay
        positions 0..pos-1 into the new group's KV caches."""
        group = self.group
        world_before, lost_all, spares_used = group.world_size, {}, 0
        for _ in range(group.world_size + 2 + (self.lobby.waiting() if self.lobby else 0)):
            lost = suspects(err, group.mesh)
            t_detect = time.perf_counter()
            self._step_times += self.master.step_times
            self.master.close()
            self._epoch += 1
            standby = self.lobby.take() if self.lobby is not None else []
            try:
                new = regroup(group, lost, self._epoch, target_world=self.target_world, standby=standby,
                              store=self.store, ratios=self.ratios,
                              shrink=lambda kept: self.placement(kept, self.ratios), slices=self.slices,
                              give_back=self.lobby.give_back if self.lobby is not None else lambda chs: None,
                              fits=self.fits)
            except TpiError as e:  # no recovery possible: one line naming what was lost and why not
                lost_all.update(lost)
                names = ", ".join(f"rank {r} ({why})" for r, why in sorted(lost_all.items()))
                why = f"cannot recover: a device failed while the group re-formed ({e})" \
                    if isinstance(e, CommError) else str(e)
                raise TpiError(f"lost {names}; {why}") from None
            lost_all.update(new.lost)
            spares_used += new.spares_used
            group, self.store, self.ratios = new.group, new.store, new.ratios
            self.member_of = {0: 0, **{r: self.member_of[old] if old is not None else mid
                                       for r, (old, mid) in new.came_from.items()}}
            try:
                self.master = Master(group, self.store, self.opts, self.env)
                t_load = time.perf_counter()
                if pos:
                    self.master.step(np.asarray(self._fed[:pos], dtype=np.int64), 0)  # KV caches rebuilt
            except CommError as e:  # another device failed in the new group: start over without it
                err = e
                continue
            rec = Recovery(lost_all, world_before, group.world_size, spares_used, t_detect - t_start,
                           new.probe_s, t_load - t_detect - new.probe_s, time.perf_counter() - t_load, pos)
            self.recoveries.append(rec)
            self.on_recovery(rec)
            return
        raise TpiError(f"cannot recover: devices kept failing during the recovery ({err})")

    def collect(self) -> list[RankReport]:
        return self.master.collect()

    def finish(self) -> list[RankReport]:
        return self.master.finish()

    def close(self) -> None:
        self.master.close()
