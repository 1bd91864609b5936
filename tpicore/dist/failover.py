"""Failover: the messages and steps that let a group lose a device and go on with the survivors.

Layer: dist (below tensor_parallel.py, which drives it). Owns the regroup protocol on the existing
master <-> worker channels (CONTROL frames only; no new frame kinds, nothing pickled), the assignment a
member gets, how a member obtains its new slice (its own copy of the model, sharded locally, or the files
sent by the master over the authenticated, sealed channel), and the recovery record. Must not run steps,
sample, or hold KV caches (tensor_parallel.py replays the history into a fresh Master).

    master                                          each surviving worker / standby member (lobby)
      {op: regroup, epoch}                -------->  arrives mid-step (a ControlMessage where data was
                                                     expected) or while idle; the member drops its device
                                                     and mesh links, opens a mesh listener
                                          <--------  {op: alive, epoch, has_model, listen}
      (a member that does not answer within the timeout is lost too)
      {op: assign, epoch, rank, world_size, ratios, private_layers, fingerprint, source, mesh, peers}
      [source "master": {op: files, files: [{name, nbytes}]} then each file as uint8 TENSOR chunks]
                                                     source "keep": its slice is unchanged; "local": shard
                                                     its own model copy; checks the fingerprint; wires the mesh
                                          <--------  {op: assigned, epoch}
      ... then tensor_parallel's usual setup message, and steps. While idle: {op: ping} -> {op: pong}.

What a party sees is unchanged by failover: a worker still receives positions and hidden states only;
slices sent by the master are the same tensors `tpi shard` would have written for that worker.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np

from tpicore.comm.channel import Channel, ControlMessage, PeerLost, PeerTimeout
from tpicore.comm.endpoint import open_listener
from tpicore.comm.frame import CommError, Kind, ProtocolError, parse_json
from tpicore.comm.group import Group, wire_mesh
from tpicore.comm.handshake import Terms
from tpicore.errors import TpiError
from tpicore.tools.shard import cached_shards, default_cache_root, prepare_job
from tpicore.weights.store import TensorStore

FILE_CHUNK_NBYTES = 16 << 20  # one TENSOR frame of a slice file sent by the master
KEEPALIVE_FRACTION = 0.25  # while a slice loads, each side says it is alive every quarter of the timeout
SOURCES = ("keep", "local", "master")
T = TypeVar("T")


class Regroup(TpiError):
    """The master is regrouping (epoch `epoch`): this member leaves its current group and answers."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"the master is regrouping (epoch {epoch})")
        self.epoch = epoch


class MasterLost(TpiError):
    """The master closed the connection or went silent: a worker cannot go on without it."""


class Stopped(TpiError):
    """The master ended the session while this member waited for an assignment."""


def regroup_epoch(msg: dict, peer: str) -> int:
    epoch = msg.get("epoch")
    if type(epoch) is not int or epoch < 1:
        raise ProtocolError(f"{peer} sent a regroup message with epoch {epoch!r}, expected an integer >= 1")
    return epoch


def as_regroup(err: ControlMessage, peer: str) -> Regroup:
    """A control message that interrupted a step: a regroup, else the protocol error it is."""
    if err.message.get("op") != "regroup":
        raise err
    return Regroup(regroup_epoch(err.message, peer))


# ------------------------------------------------------------------------------------------------
# the assignment


@dataclass(frozen=True)
class Assignment:
    """What the master tells a member after a regroup: its rank in the new group and where its slice
    comes from."""

    epoch: int
    rank: int
    world_size: int
    ratios: tuple[float, ...]
    private_layers: int
    fingerprint: str
    source: str  # "keep" | "local" | "master"
    mesh: bool
    peers: dict = field(default_factory=dict)  # {str(rank): [host, port]} when mesh

    def to_json(self) -> dict:
        return {"op": "assign", "epoch": self.epoch, "rank": self.rank, "world_size": self.world_size,
                "ratios": list(self.ratios), "private_layers": self.private_layers,
                "fingerprint": self.fingerprint, "source": self.source, "mesh": self.mesh, "peers": self.peers}

    @classmethod
    def from_json(cls, msg: dict, peer: str) -> "Assignment":
        def need(name: str, typ: type) -> object:
            v = msg.get(name)
            if type(v) is not typ:
                raise ProtocolError(f"{peer}: assignment field {name!r} is {v!r}, expected {typ.__name__}")
            return v
        ratios = need("ratios", list)
        if not all(isinstance(r, (int, float)) and r > 0 for r in ratios):
            raise ProtocolError(f"{peer}: assignment ratios {ratios!r} are not positive numbers")
        a = cls(epoch=need("epoch", int), rank=need("rank", int), world_size=need("world_size", int),
                ratios=tuple(float(r) for r in ratios), private_layers=need("private_layers", int),
                fingerprint=need("fingerprint", str), source=need("source", str), mesh=need("mesh", bool),
                peers=need("peers", dict))
        if not 1 <= a.rank < a.world_size or len(a.ratios) != a.world_size or a.source not in SOURCES:
            raise ProtocolError(f"{peer}: inconsistent assignment (rank {a.rank}, world size {a.world_size}, "
                                f"{len(a.ratios)} ratios, source {a.source!r})")
        return a


@dataclass(frozen=True)
class Recovery:
    """One recovery, as the user sees it (a line, a --json field, a serve metric)."""

    lost: dict[int, str]  # rank before the loss -> why it was declared lost
    world_before: int
    world_after: int
    spares_used: int
    detect_s: float  # from the failed step's start (or the heartbeat) to the error that started recovery
    replan_s: float  # probing the survivors and spares, planning the new split
    load_s: float  # every member obtaining its slice, the master its own, and the new devices set up
    rebuild_s: float  # replaying the history into the new KV caches
    replayed_tokens: int

    @property
    def total_s(self) -> float:
        return self.detect_s + self.replan_s + self.load_s + self.rebuild_s

    def to_json(self) -> dict:
        return {"lost": {str(r): why for r, why in self.lost.items()}, "world_before": self.world_before,
                "world_after": self.world_after, "spares_used": self.spares_used, "detect_s": self.detect_s,
                "replan_s": self.replan_s, "load_s": self.load_s, "rebuild_s": self.rebuild_s,
                "replayed_tokens": self.replayed_tokens, "total_s": self.total_s}

    def line(self) -> str:
        spare = f", {self.spares_used} spare(s) took over" if self.spares_used else ""
        if self.lost:
            what = "lost " + ", ".join(f"rank {r} ({why})" for r, why in sorted(self.lost.items())) + "; recovered"
        else:
            what, spare = f"admitted {self.spares_used} standby device(s)", ""
        return (f"{what} on {self.world_after} devices{spare} in {self.total_s:.2f} s "
                f"(detect {self.detect_s:.2f}, re-plan {self.replan_s:.2f}, load {self.load_s:.2f}, "
                f"rebuild {self.rebuild_s:.2f} s for {self.replayed_tokens} tokens)")


# ------------------------------------------------------------------------------------------------
# member (worker) side


@dataclass(frozen=True)
class Member:
    """What a worker brings to a regroup: its own copy of the model (None: slices come from the master)."""

    model: str | None
    secret: bytes | None
    timeout_s: float
    cache_root: str | None = None


def next_control(ch: Channel, epoch: int | None = None) -> dict:
    """The next control message from the master, answering pings and dropping data frames of an
    interrupted step; a newer regroup than `epoch` raises Regroup."""
    while True:
        hdr, payload = ch.recv_any((Kind.CONTROL, Kind.TENSOR, Kind.BCAST))
        if hdr.kind != Kind.CONTROL:
            continue
        msg = parse_json(payload, ch.peer)
        op = msg.get("op")
        if op == "ping":
            ch.send_json(Kind.CONTROL, {"op": "pong"})
        elif op == "wait":  # the master is still loading: keep waiting
            continue
        elif op == "regroup" and regroup_epoch(msg, ch.peer) != epoch:
            raise Regroup(msg["epoch"])
        else:
            return msg


def await_regroup(ch: Channel, while_doing: str = "waiting for it to regroup") -> Regroup:
    """Wait for the master's regroup, answering pings: after a mesh peer failed (it will notice too), or as
    a spare in the lobby. Losing the master raises MasterLost; its "stop" raises Stopped."""
    try:
        msg = next_control(ch)
    except Regroup as r:
        return r
    except (PeerLost, PeerTimeout) as e:
        raise MasterLost(f"lost the master while {while_doing}: {e}") from None
    if msg.get("op") == "stop":
        raise Stopped("the master ended the session")
    raise ProtocolError(f"{ch.peer} sent {msg.get('op')!r} while a regroup was due")


def rejoin(master: Channel, member: Member, epoch: int, store: TensorStore | None,
           env_link_hook=None) -> tuple[Group, TensorStore]:
    """Answer the master's regroup and take the new assignment: returns this member's new group (one
    channel to the master, plus the mesh if asked) and its store for the new slice."""
    mesh_lst = open_listener(master.sock.getsockname()[0], 0)
    try:
        while True:
            master.send_json(Kind.CONTROL, {"op": "alive", "epoch": epoch, "has_model": member.model is not None,
                                            "listen": list(mesh_lst.getsockname()[:2])})
            try:
                msg = next_control(master, epoch)
                break
            except Regroup as r:  # the master lost another device meanwhile: answer the newer epoch
                epoch = r.epoch
        if msg.get("op") == "stop":
            raise Stopped("the master ended the session")
        if msg.get("op") != "assign":
            raise ProtocolError(f"{master.peer} sent {msg.get('op')!r}, expected an assignment")
        a = Assignment.from_json(msg, master.peer)
        master.relabel(rank=a.rank)
        if a.source == "local":  # sharding its own copy can take long: tell the master it is alive meanwhile
            store = while_waiting([master], lambda: obtain_slice(master, member, a, store), member.timeout_s,
                                  op="loading")
        else:
            store = obtain_slice(master, member, a, store)
        channels = {0: master}
        if a.mesh:
            wire_mesh(a.rank, a.world_size, a.peers, mesh_lst, channels,
                      terms=Terms(a.world_size, a.fingerprint, master.sealed), secret=member.secret,
                      timeout_s=member.timeout_s)
        group = Group(a.rank, a.world_size, channels, timeout_s=member.timeout_s, mesh=a.mesh)
        if env_link_hook is not None:
            group.link_hook = env_link_hook
        master.send_json(Kind.CONTROL, {"op": "assigned", "epoch": a.epoch})
        return group, store
    except (PeerLost, PeerTimeout) as e:
        if e.peer_rank == 0:
            raise MasterLost(f"lost the master during a regroup: {e}") from None
        raise
    finally:
        mesh_lst.close()


def obtain_slice(master: Channel, member: Member, a: Assignment, store: TensorStore | None) -> TensorStore:
    """This member's store for assignment `a`: kept, sharded from its own model copy, or received."""
    if a.source == "keep":
        if store is None or store.fingerprint != a.fingerprint or store.layout.rank != a.rank:
            raise TpiError(f"rank {a.rank}: told to keep a slice it does not hold")
        return store
    if a.source == "local":
        if member.model is None:
            raise TpiError(f"rank {a.rank}: told to shard its own model copy, but it has none")
        folder = cached_shards(member.model, a.world_size, a.ratios, cache_root=member.cache_root, quiet=True,
                               private_layers=a.private_layers, ranks=[a.rank])[a.rank]
    else:
        folder = receive_files(master, os.path.join(member.cache_root or default_cache_root(), "received",
                                                    f"{a.fingerprint[:16]}-rank-{a.rank}"))
    new = TensorStore.from_shard_dir(folder)
    if new.fingerprint != a.fingerprint or new.layout.rank != a.rank:
        raise TpiError(f"{folder}: holds rank {new.layout.rank} of model {new.fingerprint[:12]}, the master assigned "
                       f"rank {a.rank} of {a.fingerprint[:12]} (a different model copy?)")
    new.check()
    return new


def send_files(ch: Channel, folder: str) -> int:
    """Send every file of a shard folder over `ch` (sealed when the group is); returns the bytes sent."""
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    sizes = [os.path.getsize(os.path.join(folder, n)) for n in names]
    ch.send_json(Kind.CONTROL, {"op": "files", "files": [{"name": n, "nbytes": s} for n, s in zip(names, sizes)]})
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            while True:
                chunk = f.read(FILE_CHUNK_NBYTES)
                if not chunk:
                    break
                ch.send_array(Kind.TENSOR, np.frombuffer(chunk, dtype=np.uint8))
    return sum(sizes)


def receive_files(ch: Channel, out: str) -> str:
    """Receive a shard folder sent by `send_files` into `out` (written under a temporary name, then
    renamed: a failure leaves nothing half-written)."""
    msg = next_control(ch)
    files = msg.get("files")
    if msg.get("op") != "files" or not isinstance(files, list):
        raise ProtocolError(f"{ch.peer} sent {msg.get('op')!r}, expected the slice's files")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for entry in files:
            name, nbytes = entry.get("name") if isinstance(entry, dict) else None, \
                entry.get("nbytes") if isinstance(entry, dict) else None
            if not isinstance(name, str) or os.path.basename(name) != name or name.startswith(".") \
                    or type(nbytes) is not int or nbytes < 0:
                raise ProtocolError(f"{ch.peer} sent a bad file entry {entry!r}")
            with open(os.path.join(tmp, name), "wb") as f:
                left = nbytes
                while left:
                    chunk = ch.recv_array(Kind.TENSOR)
                    if chunk.dtype != np.uint8 or chunk.ndim != 1 or chunk.size > left:
                        raise ProtocolError(f"{ch.peer} sent a bad chunk of {name}")
                    f.write(chunk.tobytes())
                    left -= chunk.size
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------
# master side


@dataclass
class Alive:
    """A member that answered a regroup: its channel, whether it has its own model copy, its mesh address."""

    channel: Channel
    has_model: bool
    listen: list | None
    old_rank: int | None  # its rank before (None: a standby member)
    member_id: int  # its channel's peer rank when probed: the old rank, or a standby member's lobby id


def probe(channels: dict[int, Channel], epoch: int, lost: dict[int, str]) -> dict[int, Alive]:
    """Send the regroup to every channel not already lost and collect the answers (each within its
    channel's timeout); a channel that fails is added to `lost` and closed. Keys: the channels' keys."""
    asked = {}
    for key, ch in channels.items():
        try:
            ch.send_json(Kind.CONTROL, {"op": "regroup", "epoch": epoch})
            asked[key] = ch
        except CommError as e:
            lost[key] = _why(e)
            ch.close(bye=False)
    alive = {}
    for key, ch in asked.items():
        try:
            msg = _await_alive(ch, epoch)
        except CommError as e:
            lost[key] = _why(e)
            ch.close(bye=False)
            continue
        listen = msg.get("listen")
        alive[key] = Alive(ch, bool(msg.get("has_model")), listen if isinstance(listen, list) else None, None,
                           ch.peer_rank)
    return alive


def _await_alive(ch: Channel, epoch: int) -> dict:
    """The member's answer to regroup `epoch`, dropping what an interrupted step left in flight."""
    deadline = time.monotonic() + ch.timeout_s
    while True:
        hdr, payload = ch.recv_any((Kind.CONTROL, Kind.TENSOR, Kind.BCAST))
        if hdr.kind == Kind.CONTROL:
            msg = parse_json(payload, ch.peer)
            if msg.get("op") == "alive" and msg.get("epoch") == epoch:
                return msg
        if time.monotonic() > deadline:
            raise PeerTimeout(f"{ch.peer} did not answer the regroup within {ch.timeout_s:.1f} s").at(ch.peer_rank)


def _why(e: BaseException) -> str:
    if isinstance(e, PeerTimeout):
        return f"silent: {e}"
    if isinstance(e, PeerLost):
        return f"disconnected: {e}"
    return str(e)


def await_assigned(ch: Channel, epoch: int) -> None:
    """The member's word that it holds its slice (its "loading" keepalives reset the channel's timeout)."""
    while True:
        msg = parse_json(ch.recv_array(Kind.CONTROL), ch.peer)
        if msg.get("op") == "assigned" and msg.get("epoch") == epoch:
            return
        if msg.get("op") not in ("pong", "loading"):
            raise ProtocolError(f"{ch.peer} sent {msg.get('op')!r}, expected 'assigned'")


def while_waiting(channels: list[Channel], work: Callable[[], T], timeout_s: float, op: str = "wait") -> T:
    """Run `work` (loading or sharding a slice: seconds to minutes) in a thread while telling the peers on
    `channels` every KEEPALIVE_FRACTION of the timeout that this end is alive (a CONTROL {op} they need
    not answer), so nobody's silence timer runs out meanwhile."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, work()))
        except BaseException as e:  # handed to the caller's thread
            out.append((False, e))

    t = threading.Thread(target=run, name="tpi-failover-load", daemon=True)
    t.start()
    while True:
        t.join(timeout_s * KEEPALIVE_FRACTION)
        if not t.is_alive():
            break
        for ch in channels:
            ch.send_json(Kind.CONTROL, {"op": op})
    ok, value = out[0]
    if not ok:
        raise value
    return value


@dataclass(frozen=True)
class Regrouped:
    """A new group formed by `regroup`: the master's store for its new slice and what it took."""

    group: Group
    store: TensorStore
    ratios: tuple[float, ...]
    lost: dict[int, str]
    spares_used: int
    came_from: dict[int, tuple[int | None, int]]  # new rank -> (its old rank or None, its member id)
    probe_s: float  # the survivors' and spares' answers, and the plan
    load_s: float  # every member's slice, and the master's own


class SliceSource:
    """Where the master finds every rank's folder for a split: its model (sharded into the local cache)
    or the `tpi shard` output it was started with (only that one split)."""

    def __init__(self, model: str | None, shards_root: str | None, shards_layout: tuple[int, tuple[float, ...]] | None,
                 private_layers: int, cache_root: str | None = None) -> None:
        self.model, self.shards_root, self.shards_layout = model, shards_root, shards_layout
        self.private_layers, self.cache_root = private_layers, cache_root

    def can_fingerprint(self, world_size: int, ratios: tuple[float, ...]) -> bool:
        """Whether the split's fingerprint is known before its folders are written (from the model's headers)."""
        return self.model is not None

    def fingerprint(self, world_size: int, ratios: tuple[float, ...]) -> str:
        """The fingerprint shards of this split carry (the model's headers and a few KiB, nothing written)."""
        job = prepare_job(self.model, world_size, ratios, self.private_layers)
        job.ckpt.close()
        return job.fingerprint

    def folders(self, world_size: int, ratios: tuple[float, ...], ranks: list[int] | None = None) -> list[str] | None:
        """Every rank's folder (those of `ranks` checked when the cache is reused), or None: no source."""
        if self.model is not None:
            return cached_shards(self.model, world_size, ratios, cache_root=self.cache_root, quiet=True,
                                 private_layers=self.private_layers, ranks=ranks)
        if self.shards_root is not None and self.shards_layout == (world_size, tuple(ratios)):
            return [os.path.join(self.shards_root, f"rank-{r}") for r in range(world_size)]
        return None


def regroup(group: Group, lost: dict[int, str], epoch: int, *, target_world: int, standby: list[Channel],
            store: TensorStore,
            ratios: tuple[float, ...], shrink: Callable[[list[int]], tuple[float, ...]], slices: SliceSource,
            give_back: Callable[[list[Channel]], None],
            fits: Callable[[int, tuple[float, ...]], str | None] | None = None) -> Regrouped:
    """Form the next group: probe every worker not in `lost` and every standby member, let spares take
    lost ranks (the split unchanged: survivors keep their slices), else re-split over who is left
    (`shrink(kept old ranks) -> ratios`), hand out the slices, and wait until every member is ready.
    Raises CommError when a member fails meanwhile (the caller starts a newer epoch), TpiError when no
    recovery is possible (`fits(world, ratios)`, when given, names why a split cannot run, e.g. memory)."""
    t0 = time.perf_counter()
    n = group.world_size
    channels = {r: ch for r, ch in group.channels.items() if r not in lost}
    for r in lost:
        if r in group.channels:
            group.channels[r].close(bye=False)
    alive = probe(channels, epoch, lost)
    spare_lost: dict[int, str] = {}
    spares = list(probe(dict(enumerate(standby)), epoch, spare_lost).values())
    survivors = sorted(alive)
    gone = sorted(r for r in lost if r < n)
    for r in survivors:
        alive[r].old_rank = r
    if gone and len(spares) >= len(gone):  # spares take the lost ranks: same split, survivors keep their slices
        used, rest = spares[:len(gone)], spares[len(gone):]
        new_ratios, members = tuple(ratios), {r: alive[r] for r in survivors}
        members.update({r: a for r, a in zip(gone, used)})
    else:  # re-split over everyone left, with spares (or devices come back) up to the target size
        room = max(0, target_world - 1 - len(survivors))
        used, rest = spares[:room], spares[room:]
        order = [alive[r] for r in survivors] + used
        new_ratios = tuple(shrink(survivors + [-1] * len(used)))
        members = {i + 1: a for i, a in enumerate(order)}
    give_back([a.channel for a in rest])
    world = 1 + len(members)
    same_split = world == n and new_ratios == tuple(ratios)
    too_big = None if same_split or fits is None else fits(world, new_ratios)
    if too_big is not None:  # e.g. a device's memory cap: tell the members, then give up
        for a in members.values():
            a.channel.close(bye=False)
        raise TpiError(f"cannot recover: {world} devices are too few ({too_big})")
    t_plan = time.perf_counter()
    chans = [a.channel for a in members.values()]
    sources = {r: "keep" if same_split and a.old_rank == r else "local" if a.has_model else "master"
               for r, a in members.items()}
    folders: list[str] | None = None
    if "master" in sources.values() or not slices.can_fingerprint(world, new_ratios):  # rank 0 shards first
        needed = [0] + [r for r, src in sources.items() if src == "master"]
        folders = None if same_split and "master" not in sources.values() else \
            while_waiting(chans, lambda: slices.folders(world, new_ratios, needed), group.timeout_s)
        if folders is None and not same_split:
            raise TpiError(f"cannot recover: {world} devices need a new split and rank 0 has no source for the "
                           "slices (start the master with --model, not only --shards)")
        if folders is None and "master" in sources.values():
            raise TpiError("cannot recover: a device taking a rank has no model copy and rank 0 has no source for "
                           "its slice (start workers or the master with --model)")
    fingerprint = store.fingerprint if same_split else \
        TensorStore.from_shard_dir(folders[0]).fingerprint if folders is not None else \
        slices.fingerprint(world, new_ratios)
    mesh = group.mesh
    peers = {str(r): a.listen for r, a in members.items()} if mesh else {}
    for r, a in sorted(members.items()):  # assignments first: the members load while rank 0 does
        assignment = Assignment(epoch, r, world, new_ratios, store.layout.private_layers, fingerprint, sources[r],
                                mesh, peers)
        a.channel.send_json(Kind.CONTROL, assignment.to_json())
        a.channel.relabel(peer_rank=r)
        if sources[r] == "master":
            send_files(a.channel, folders[r])
    if same_split:
        new_store = store
    else:
        def load_own() -> TensorStore:
            own = TensorStore.from_shard_dir(folders[0] if folders is not None else
                                             slices.folders(world, new_ratios, [0])[0])
            own.check()
            return own
        new_store = while_waiting(chans, load_own, group.timeout_s)
        if new_store.fingerprint != fingerprint:
            raise TpiError(f"cannot recover: rank 0's new slice has fingerprint {new_store.fingerprint[:12]}, "
                           f"expected {fingerprint[:12]}")
    for r, a in sorted(members.items()):
        await_assigned(a.channel, epoch)
    new = Group(0, world, {r: a.channel for r, a in members.items()}, timeout_s=group.timeout_s, mesh=mesh)
    new.keep_on_failure = True
    new.link_hook = group.link_hook
    came_from = {r: (a.old_rank, a.member_id) for r, a in members.items()}
    return Regrouped(new, new_store, new_ratios, lost, len(used), came_from, t_plan - t0,
                     time.perf_counter() - t_plan)
