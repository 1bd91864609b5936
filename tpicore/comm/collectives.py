"""Collectives over a `Group`: allreduce (star, ring, tree) and broadcast.

Owns the communication pattern and the summation order, nothing else: sockets, framing, sealing and
the link hook are the channels' (channel.py, duplex.py, group.py), and the model only ever sees `Collective(group, algo)` as its `allreduce`
function. Every algorithm adds in a fixed order for a given world size N, so results are bit-identical
from run to run (the algorithms differ from one another only by fp32 rounding).

    star (workers push to rank 0, which sums x0 + x1 + ... + x_{N-1} and pushes the sum back):
        1 --\\            /--> 1          2 (N-1) messages, 2 link hops on the critical path,
        2 ---> 0 (sum) ----> 2          rank 0's link carries N-1 payloads each way
        3 --/            \\--> 3
    ring (reduce-scatter, then all-gather; N chunks, each rank sends to r+1 and receives from r-1):
        0 -> 1 -> 2 -> 3 -> 0          2 (N-1) steps of 1/N of the payload
    tree (binary below a three-way root: 0 -> 1 2 3, r -> 2r+2 2r+3; reduce up, broadcast down):
              0                         depth 2 for N = 8 (the paper's tree), then one level
           1  2  3                      per doubling
          45  67 89
"""

from __future__ import annotations

import numpy as np

from tpicore.comm.channel import Spin, spin_budget_s
from tpicore.comm.duplex import exchange
from tpicore.comm.frame import Kind, contiguous
from tpicore.comm.group import Group
from tpicore.errors import TpiError

ALGOS = ("star", "ring", "tree")


def allreduce(group: Group, x: np.ndarray, algo: str = "star") -> np.ndarray:
    """Sum `x` over all ranks; every rank gets the same, bit-identical result.

    x: float32 array of the same shape on every rank. It is reduced in place when C-contiguous and
    writable (else a copy is) and the result is returned. On a transport failure the group is aborted
    (peers are told why) and the PeerLost/PeerTimeout/ProtocolError propagates.
    """
    impl = _IMPLS.get(algo)
    if impl is None:
        raise TpiError(f"unknown allreduce algorithm {algo!r}; expected one of {', '.join(ALGOS)}")
    if x.dtype != np.float32:
        raise TpiError(f"allreduce takes float32 arrays, got {x.dtype}")
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, dtype=np.float32, order="C")
    if group.world_size == 1:
        return x
    tag = group.next_tag()
    try:
        impl(group, x, tag)
    except TpiError as e:
        group.abort(e)
        raise
    return x


def broadcast(group: Group, x: np.ndarray | None = None, root: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Send the root's `x` to every rank. Others pass None and get a new array shaped by the header
    (or pass a preallocated `out` of the right shape and dtype)."""
    if not 0 <= root < group.world_size:
        raise TpiError(f"broadcast root {root} out of range for world_size {group.world_size}")
    if group.rank == root:
        if x is None:
            raise TpiError(f"rank {root} is the broadcast root and must pass an array")
        x = contiguous(x)
    if group.world_size == 1:
        return x  # type: ignore[return-value]
    tag = group.next_tag()
    try:
        if group.rank == root:
            for r in range(group.world_size):
                if r != root:
                    group.channel(r).send_array(Kind.BCAST, x, tag)  # type: ignore[arg-type]
            return x  # type: ignore[return-value]
        ch = group.channel(root)
        return ch.recv_into(out, Kind.BCAST, tag) if out is not None else ch.recv_array(Kind.BCAST, tag)
    except TpiError as e:
        group.abort(e)
        raise


def set_spin(group: Group, spin_s: float) -> None:
    """Let every receive of this rank poll for `spin_s` before blocking (0: block at once)."""
    for ch in group.channels.values():
        ch.spin = Spin(spin_s)


class Collective:
    """`allreduce` bound to a group and an algorithm: pass an instance as the model's `allreduce`.

    Its receives spin briefly before blocking (channel.spin_budget_s) unless the group has more ranks
    than this host has cores; `spin=False` never spins."""

    def __init__(self, group: Group, algo: str = "star", spin: bool = True) -> None:
        if algo not in ALGOS:
            raise TpiError(f"unknown allreduce algorithm {algo!r}; expected one of {', '.join(ALGOS)}")
        if algo != "star" and group.world_size > 2 and not group.mesh:
            raise TpiError(f"{algo} allreduce needs worker-to-worker links: build the group with mesh=True")
        self.group = group
        self.algo = algo
        set_spin(group, spin_budget_s(group.world_size) if spin else 0.0)

    def __repr__(self) -> str:
        return f"Collective({self.algo}, rank {self.group.rank} of {self.group.world_size})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return allreduce(self.group, x, self.algo)


def _star(group: Group, x: np.ndarray, tag: int) -> None:
    if group.rank == 0:
        buf = group.scratch(x.size)[: x.size].reshape(x.shape)  # reused receive buffer
        for r in range(1, group.world_size):  # rank order, whatever order the data arrives in
            group.channel(r).recv_into(buf, Kind.TENSOR, tag)
            x += buf  # ((x0 + x1) + x2) + ...
        for r in range(1, group.world_size):
            group.channel(r).send_array(Kind.TENSOR, x, tag)
    else:
        ch = group.channel(0)
        ch.send_array(Kind.TENSOR, x, tag)
        ch.recv_into(x, Kind.TENSOR, tag)


def chunk_bounds(n: int, parts: int) -> list[int]:
    """Start offsets of `np.array_split(range(n), parts)` plus n: the first n % parts chunks get one more."""
    q, rem = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + q + (1 if i < rem else 0))
    return bounds


def _ring(group: Group, x: np.ndarray, tag: int) -> None:
    n, r = group.world_size, group.rank
    flat = x.reshape(-1)  # a view: x is C-contiguous
    b = chunk_bounds(flat.size, n)
    nxt, prv = group.channel((r + 1) % n), group.channel((r - 1) % n)
    buf = group.scratch(b[1] - b[0])

    def chunk(c: int) -> np.ndarray | None:
        c %= n
        return flat[b[c]:b[c + 1]] if b[c + 1] > b[c] else None  # empty chunks are not sent at all

    # reduce-scatter: after step s, rank r holds chunk (r - s - 1) summed over ranks r-s-1 .. r
    for s in range(n - 1):
        out, inc = chunk(r - s), chunk(r - s - 1)
        recv = buf[: inc.size] if inc is not None else None
        exchange(nxt, Kind.TENSOR, out, tag, prv if inc is not None else None, recv)
        if inc is not None:
            inc += recv  # received partial sum + own contribution: a fixed order per chunk
    # all-gather: rank r now owns the full sum of chunk r + 1; pass finished chunks around the ring
    for s in range(n - 1):
        out, inc = chunk(r + 1 - s), chunk(r - s)
        exchange(nxt, Kind.TENSOR, out, tag, prv if inc is not None else None, inc)


def tree_children(r: int, n: int) -> list[int]:
    """Children of rank r: the root has three (1, 2, 3), every other rank two (2r+2, 2r+3).

    A binary tree below a three-way root keeps 8 ranks at depth 2 (0 / 1 2 3 / 4 5 6 7), the
    paper's depth-2 tree for its 8 devices (16 link latencies on Klonet); a plain binary tree
    would need depth 3 there.
    """
    kids = (1, 2, 3) if r == 0 else (2 * r + 2, 2 * r + 3)
    return [c for c in kids if c < n]


def tree_parent(c: int) -> int:
    return 0 if c <= 3 else (c - 2) // 2


def _tree(group: Group, x: np.ndarray, tag: int) -> None:
    r, n = group.rank, group.world_size
    children = tree_children(r, n)
    if children:
        buf = group.scratch(x.size)[: x.size].reshape(x.shape)
        for c in children:  # children in rank order: x_r + c1 + c2 (+ c3)
            group.channel(c).recv_into(buf, Kind.TENSOR, tag)
            x += buf
    if r:
        parent = group.channel(tree_parent(r))
        parent.send_array(Kind.TENSOR, x, tag)
        parent.recv_into(x, Kind.TENSOR, tag)
    for c in children:
        group.channel(c).send_array(Kind.TENSOR, x, tag)


_IMPLS = {"star": _star, "ring": _ring, "tree": _tree}
