"""The link model of one allreduce: messages on the critical path of each algorithm, links per route.

Layer: config (imports tpicore.comm.collectives only, for the tree's shape). Read by the allreduce sweep
(emulator/run/allreduce_sweep.py: a results line's model_s) and by the figures (Fig. 3, the link-latency
sweep's model lines), which is why it sits below both. Must not measure, plot or import above config.

    hops(algo, n)     device-to-device messages on the critical path of one allreduce over n devices:
                      star 2 (up to the root, back down), tree 2 x its depth, ring 2 (N - 1)
    ROUTE_LINKS       links between two devices per topology shape (emulator/config/topology.py):
                      klonet 4 (device, home gateway, core router, gateway, device), star 2, full 1
    PAPER_TAU         the paper's Fig. 3 counts in tau at 8 devices on Klonet: hops x 4 links
"""

from __future__ import annotations

from tpicore.comm.collectives import tree_parent

ALGOS = ("star", "tree", "ring")
ROUTE_LINKS = {"klonet": 4, "star": 2, "full": 1}
PAPER_TAU = {"star": 8, "tree": 16, "ring": 56}  # the paper's Fig. 3 model, 8 devices on Klonet


def tree_depth(n: int) -> int:
    """Edges from the deepest of n ranks up to rank 0 in tpicore.comm.collectives' tree."""
    depth = 0
    for r in range(1, n):
        d, c = 0, r
        while c:
            c, d = tree_parent(c), d + 1
        depth = max(depth, d)
    return depth


def hops(algo: str, n: int) -> int:
    """Device-to-device messages on the critical path of one allreduce over n devices."""
    if n <= 1:
        return 0
    return {"star": 2, "tree": 2 * tree_depth(n), "ring": 2 * (n - 1)}[algo]
