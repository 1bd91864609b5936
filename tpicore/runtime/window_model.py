"""The window scheduler's planning model: which blocks it keeps, how it assigns slabs, when it stalls.

Layer: runtime (imports nothing from tpicore). Owns the pure functions the scheduler
(tpicore.runtime.window) and the predictor (tpicore.tools.predictor) share: `retained_layers` (the paper's
Prop. 6 retention), `SlabPool` (which slab a block goes to, by size), `check_steady` (the paper's
steady conditions) and `simulate_window` (a replay of the scheduler on given per-block times). Must
not read files, start threads or measure anything.
"""

from __future__ import annotations

import math
from typing import TypedDict


class SteadyCheck(TypedDict):
    """check_steady's verdict (a JSON object in reports and results lines)."""

    tight: bool  # every block's compute + allreduce covers the next block's load
    loose: bool  # the step budget and, for every l, one of the prefix inequalities hold
    tight_attn: bool
    tight_ffn: bool
    budget: bool
    first_violation_layer: int | None
    failed: list[str]  # the conditions that failed, in words
    retain_every: int
    measured: dict[str, float]  # t_attn, t_ffn, t_ar, tau_attn, tau_ffn (seconds)


def retained_layers(n_layers: int, retain_every: int) -> set[int]:
    """Layers whose FFN block retention keeps: 0, T, 2T, ... (ceil(L/T) of them; none when T = 0)."""
    return set(range(0, n_layers, retain_every)) if retain_every > 0 else set()


class SlabPool:
    """Which slab each loaded block goes to, by size only (the planner replays it to predict memory).

    At most `limit` slabs. A block takes the smallest free slab it fits; when none fits, a new slab while
    fewer than `limit` exist, else the largest free slab is replaced by one of the block's size.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []  # float32 elements of each slab
        self.free: list[int] = []

    def take(self, elems: int) -> tuple[int, bool]:
        """(slab index, whether it must be (re)allocated at `elems`). Needs a free slab or room for one."""
        fits = [i for i in self.free if self.sizes[i] >= elems]
        if fits:
            i = min(fits, key=lambda i: self.sizes[i])
            self.free.remove(i)
            return i, False
        if len(self.sizes) < self.limit:
            self.sizes.append(elems)
            return len(self.sizes) - 1, True
        i = max(self.free, key=lambda i: self.sizes[i])
        self.free.remove(i)
        self.sizes[i] = elems
        return i, True

    def give_back(self, i: int) -> None:
        self.free.append(i)

    @property
    def total(self) -> int:
        return sum(self.sizes)


# ---------------------------------------------------------------------------------------------
# The paper's steady conditions


def check_steady(t_attn: float, t_ffn: float, t_ar: float, tau_attn: float, tau_ffn: float, L: int,
                 retain_every: int = 0) -> SteadyCheck:
    """Whether loading can hide behind compute + allreduce (TPI-LLM, sliding-window section).

    t_attn, t_ffn: compute time of one Attn / FFN block; t_ar: one allreduce; tau_attn, tau_ffn: load time
    of one block (seconds). Tight (I/O fully hidden): every block's compute + allreduce covers
    the next block's load: t_attn + t_ar >= tau_ffn and t_ffn + t_ar >= tau_attn. Loose (one step's
    budget covers its loads, and for every l in 1..L one of the prefix inequalities holds):
        A_l: l t_attn + (l-1) t_ffn + (2l-1) t_ar >= l tau_ffn + (l-1) tau_attn
        B_l: (l-1) t_attn + l t_ffn + (2l-1) t_ar >= (l-1) tau_ffn + l tau_attn
    With retention (keep one FFN block of every T, Prop. 6) the retained FFN blocks cost no load: among
    the first l layers ceil(l/T) of them, so l tau_ffn becomes (l - ceil(l/T)) tau_ffn in the step budget
    L (t_attn + t_ffn + 2 t_ar) >= (L - ceil(L/T)) tau_ffn + L tau_attn and in A_l (B_l: l-1 likewise).
    The paper states only the budget form and "the (l-1) variant"; applying the substitution to both
    prefix inequalities is our reading. Returns which held and the first layer l where neither did.
    """
    T = retain_every

    def kept(l: int) -> int:  # retained FFN blocks among the first l layers
        return math.ceil(l / T) if T > 0 and l > 0 else 0

    tight_attn = t_attn + t_ar >= tau_ffn  # the FFN load hides behind the Attn block before it
    tight_ffn = t_ffn + t_ar >= tau_attn  # the next Attn load hides behind the FFN block
    budget = L * (t_attn + t_ffn + 2 * t_ar) >= (L - kept(L)) * tau_ffn + L * tau_attn
    first_bad = None
    for l in range(1, L + 1):
        a = l * t_attn + (l - 1) * t_ffn + (2 * l - 1) * t_ar >= (l - kept(l)) * tau_ffn + (l - 1) * tau_attn
        b = (l - 1) * t_attn + l * t_ffn + (2 * l - 1) * t_ar >= (l - 1 - kept(l - 1)) * tau_ffn + l * tau_attn
        if not (a or b):
            first_bad = l
            break
    failed = []
    if not tight_attn:
        failed.append(f"t_attn + t_ar ({1e3 * (t_attn + t_ar):.3g} ms) < tau_ffn ({1e3 * tau_ffn:.3g} ms)")
    if not tight_ffn:
        failed.append(f"t_ffn + t_ar ({1e3 * (t_ffn + t_ar):.3g} ms) < tau_attn ({1e3 * tau_attn:.3g} ms)")
    if not budget:
        failed.append("per-step budget: L (t_attn + t_ffn + 2 t_ar) < the step's loads")
    if first_bad is not None:
        failed.append(f"prefix inequalities A_l and B_l both fail at layer l = {first_bad}")
    return {"tight": tight_attn and tight_ffn, "loose": budget and first_bad is None,
            "tight_attn": tight_attn, "tight_ffn": tight_ffn, "budget": budget, "first_violation_layer": first_bad,
            "failed": failed, "retain_every": T,
            "measured": {"t_attn": t_attn, "t_ffn": t_ffn, "t_ar": t_ar, "tau_attn": tau_attn, "tau_ffn": tau_ffn}}


def simulate_window(hold: list[float], load: list[float], window: int, retained: list[bool] | None = None,
                    steps: int = 3) -> list[float]:
    """Stall per step of this scheduler, replayed on given per-block times (the planner's prediction).

    hold[i]: time block i of the cyclic order is in use (compute + its allreduce); load[i]: its read time;
    retained[i]: kept after its first read (no window slot, no later reads). The loader reads blocks in
    order, one at a time, and may start block k only when at most window - 1 window blocks are still
    loaded or loading; the device takes blocks in order and waits for each one's read.
    """
    P = len(hold)
    retained = retained or [False] * P
    release: list[float] = []
    windowed: list[int] = []  # sequence numbers of the blocks that took a window slot
    loader = now = 0.0
    stalls = [0.0] * steps
    for k in range(P * steps):
        i, kept_already = k % P, retained[k % P] and k >= P
        if kept_already:
            ready = 0.0
        else:
            start = loader
            if not retained[i]:
                if len(windowed) >= window:
                    start = max(start, release[windowed[-window]])
                windowed.append(k)
            loader = ready = start + load[i]
        begin = max(now, ready)
        stalls[k // P] += begin - now
        now = begin + hold[i]
        release.append(now)
    return stalls
