"""Causal virtual time: messages are booked on their links in virtual-time order, whatever order the
device processes reach the shaper in (a conservative discrete-event scheme, after Chandy, Misra and
Bryant).

Owns the rule that decides when a message's delivery time is final, and the device states it reads.
Does not wait or wake anyone (shaper.py does) and does not do the link arithmetic (links.py).

Why: every device keeps its own virtual clock in its own process. Booking a link when the sender's
process happens to reach the lock (host order) let a message sent at virtual 10 ms take the master's
link before one sent at 5 ms that arrived later in host time, so the 5 ms message was delivered at
67.96 ms instead of 35.0 ms, and identical compute-free runs differed.

The scheme, all under the schedule's lock:
- on_send registers the message (t_send, src, dst, size), unbooked. Its key is (t_send, src, id).
- A message is booked when nothing with a smaller key can still reach its links: every earlier unbooked
  message sharing a link is booked, and every other rank that sends over those links has a lower bound
  on its next send with (bound, rank) > (t_send, src). Each link then sees its bookings in key order,
  so every delivery time is a function of the run, not of the host's scheduling. (Links without a
  bandwidth make nobody wait: messages on them are booked at once.)
- The lower bounds, from what each rank published at its last hook call:
      running  its clock then (clocks only move forward)
      waiting  blocked in a receive from w (the transport calls on_wait first): it sends nothing before
               that frame arrives, so max(now, its delivery): the booked time, or t_send + lookahead if
               sent but not booked, or bound(w) if not sent yet (a chain; a cycle is a deadlock: +inf)
      done     never sends again (shaper closed, or its process is gone): +inf
      unset    never attached: -inf (everyone waits for it)
- A waiting rank whose chain ends at an unbooked message is stuck: it cannot move before something is
  booked. If every rank holding back the earliest unbooked message is stuck (only possible with zero
  lookahead and exactly equal times), that message is booked anyway -- the only possible progress, and a
  deterministic one -- and counted as "forced".
- A message sent below what its sender promised (a clock that went backwards), or booked on a link
  after a later one, is counted as a violation: the stats show it, nothing hides it.
"""

from __future__ import annotations

import math
import os

from emulator.net.links import Routes, message_rng, needs_draws
from emulator.net.schedule import (
    DONE,
    H_FORCED,
    H_VIOLATIONS,
    L_LAST,
    M_DST,
    M_FP,
    M_ID,
    M_NBYTES,
    M_RESOLVED,
    M_SEED,
    M_SEQ,
    M_SRC,
    M_TDELIVER,
    M_TSEND,
    MSG_SLOTS,
    R_LIVE,
    R_NEXT,
    R_NOW,
    R_PID,
    R_STATE,
    R_WAIT,
    RANK_SLOTS,
    RUNNING,
    UNSET,
    WAITING,
    LinkSchedule,
)

INF = math.inf


class Resolver:
    """One process's view of the causal scheme over a shared schedule. Every method runs inside
    `schedule.locked()`."""

    def __init__(self, schedule: LinkSchedule, routes: Routes) -> None:
        self.schedule, self.routes = schedule, routes
        self.fp = routes.fingerprint

    # -- what a rank publishes ---------------------------------------------------------------------------
    def attach(self, rank: int, now: float) -> None:
        """A shaper for `rank` exists in this process (counted, so the last one to close marks it done)."""
        sch = self.schedule
        at = sch.rank_row(rank)
        v = sch.v
        if v[at + R_STATE] in (UNSET, DONE):
            v[at + R_STATE], v[at + R_NOW], v[at + R_WAIT] = RUNNING, now, -1.0
        v[at + R_PID] = os.getpid()
        v[at + R_LIVE] += 1

    def detach(self, rank: int) -> None:
        sch = self.schedule
        at = sch.rank_row(rank)
        sch.v[at + R_LIVE] = max(0.0, sch.v[at + R_LIVE] - 1)
        if not sch.v[at + R_LIVE]:
            sch.v[at + R_STATE] = DONE

    def publish(self, rank: int, state: float, now: float, wait_src: int = -1) -> None:
        sch = self.schedule
        at = sch.rank_row(rank)
        v = sch.v
        if v[at + R_STATE] in (RUNNING, WAITING) and now < v[at + R_NOW]:
            v[H_VIOLATIONS] += 1  # this rank's clock went back below what it promised
            now = v[at + R_NOW]
        v[at + R_STATE], v[at + R_NOW], v[at + R_WAIT] = state, now, float(wait_src)

    # -- messages ------------------------------------------------------------------------------------------
    def register(self, src: int, dst: int, nbytes: int, t_send: float, seed: int) -> None:
        """A message sent now; booked at once when nothing can contend with it."""
        sch = self.schedule
        sch.ensure_rank(max(src, dst))
        lay, v = sch.layout, sch.v
        pair, at = lay.pair(src, dst), lay.rank(src)
        seq, mid = v[pair], v[at + R_NEXT]
        v[pair] += 1
        v[at + R_NEXT] += 1
        rec = [0.0] * MSG_SLOTS
        rec[M_SRC], rec[M_DST], rec[M_SEQ], rec[M_ID] = src, dst, seq, mid
        rec[M_TSEND], rec[M_NBYTES], rec[M_FP], rec[M_SEED] = t_send, nbytes, self.fp, seed
        hops = self.routes.hops(src, dst)
        if hops is None:  # an ideal route: nothing to book, delivered as sent
            rec[M_RESOLVED], rec[M_TDELIVER] = 1.0, t_send
        sch.add_message(rec)

    def take(self, src: int, dst: int) -> float | None:
        """The delivery time of the next message src -> dst if it is booked (and forget it), else None."""
        sch = self.schedule
        pair = sch.layout.pair(src, dst)
        seq = sch.v[pair + 1]
        for slot, rec in sch.messages():
            if rec[M_SRC] == src and rec[M_DST] == dst and rec[M_SEQ] == seq:
                if not rec[M_RESOLVED]:
                    return None
                sch.drop_message(slot)
                sch.v[pair + 1] += 1
                return rec[M_TDELIVER]
        return None

    def registered(self, src: int, dst: int) -> bool:
        """Whether the next frame src -> dst was registered by its sender's shaper."""
        pair = self.schedule.layout.pair(src, dst)
        return self.schedule.v[pair] > self.schedule.v[pair + 1]

    # -- booking ---------------------------------------------------------------------------------------------
    def run(self, check_liveness: bool = False) -> set[int]:
        """Book every message that can be booked now; returns the ranks to wake (their message is in).

        Passes over the unbooked messages in key order until one books nothing. Within a pass the ranks'
        bounds are computed once (bookings only raise them, so stale ones are merely cautious: the next
        pass sees the new ones); a message is held back by the lowest (bound, rank) among its senders."""
        sch = self.schedule
        msgs = sch.messages()
        pending = sorted((rec[M_TSEND], rec[M_SRC], rec[M_ID], slot, rec) for slot, rec in msgs if not rec[M_RESOLVED])
        if not pending:
            return set()
        lay = sch.layout
        ranks = sch.v[lay.ranks_at:lay.ranks_at + RANK_SLOTS * lay.ranks].tolist()
        by_pair = {(int(rec[M_SRC]), int(rec[M_DST]), int(rec[M_SEQ])): rec for _, rec in msgs}
        n = len(self.routes.topology)
        woken: set[int] = set()
        while pending:
            bounds = _Bounds(self, ranks, by_pair, check_liveness)
            order: list[tuple[float, int]] | None = None  # (bound, rank) of every rank, lowest first
            held: set[int] = set()  # links of earlier messages still unbooked
            rest = []
            for i, item in enumerate(pending):
                t0, s0, _, slot, rec = item
                src, dst = int(s0), int(rec[M_DST])
                links = self.routes.links(src, dst)
                if links & held or rec[M_FP] != self.fp:  # behind an unbooked message, or another topology's
                    held |= links
                    rest.append(item)
                    continue
                senders = self.routes.sender_set(src, dst)
                if senders:
                    if order is None:
                        order = sorted((bounds.of(r)[0], r) for r in range(n))
                    first = next((br for br in order if br[1] in senders), None)
                    if first is not None and first <= (t0, src):
                        # held back; booked anyway only if it is the earliest message of all and every rank
                        # holding it back is stuck (bounds are fresh: nothing was booked yet in this pass)
                        stuck = i == 0 and all(bounds.of(r)[1] for b, r in order if r in senders and (b, r) <= (t0, src))
                        if not stuck:
                            held |= links
                            rest.append(item)
                            continue
                        sch.v[H_FORCED] += 1
                self._book(slot, rec, src, dst)
                woken.add(dst)
            if len(rest) == len(pending):
                break
            pending = rest
        return woken

    def _book(self, slot: int, rec: list[float], src: int, dst: int) -> None:
        sch = self.schedule
        t, nbytes = rec[M_TSEND], int(rec[M_NBYTES])
        hops = self.routes.hops(src, dst)
        rng = message_rng(int(rec[M_SEED]), src, dst, int(rec[M_SEQ])) if needs_draws(hops) else None
        for i in self.routes.links(src, dst):  # per link, bookings must come in t_send order
            at = sch.layout.link(i, True) + L_LAST
            if t < sch.v[at]:
                sch.v[H_VIOLATIONS] += 1
            sch.v[at] = max(sch.v[at], t)
        t_deliver = self.routes.cross(sch, hops, t, nbytes, rng, virtual=True)
        at = sch.layout.msg(slot)
        sch.v[at + M_RESOLVED], sch.v[at + M_TDELIVER] = 1.0, t_deliver
        rec[M_RESOLVED], rec[M_TDELIVER] = 1.0, t_deliver  # the pass's snapshot too

    def describe(self, ranks_of_interest: list[int]) -> str:
        """The published state of some ranks, for an error message."""
        names = {UNSET: "never attached", RUNNING: "running", WAITING: "waiting", DONE: "done"}
        sch = self.schedule
        out = []
        for r in ranks_of_interest:
            at = sch.rank_row(r)
            st = names.get(sch.v[at + R_STATE], "?")
            extra = f" for rank {int(sch.v[at + R_WAIT])}" if sch.v[at + R_STATE] == WAITING else ""
            out.append(f"rank {r}: {st}{extra} at {sch.v[at + R_NOW]:.6f} s")
        return "; ".join(out)


class _Bounds:
    """Lower bounds on each rank's next send time, memoised for one booking pass."""

    def __init__(self, resolver: Resolver, ranks: list[float], by_pair: dict, check_liveness: bool) -> None:
        self.res, self.ranks, self.by_pair, self.check_liveness = resolver, ranks, by_pair, check_liveness
        self.memo: dict[int, tuple[float, bool]] = {}

    def clear(self) -> None:
        self.memo.clear()

    def of(self, r: int, visiting: frozenset[int] = frozenset()) -> tuple[float, bool]:
        """(bound, stuck) for rank r; `visiting`: the waiting chain that led here."""
        if r in self.memo:
            return self.memo[r]
        if r in visiting:
            return (INF, True)  # everyone on this chain waits for the next one: nobody sends
        sch = self.res.schedule
        if r >= sch.layout.ranks:
            return (-INF, False)
        base = r * RANK_SLOTS
        state, now = self.ranks[base + R_STATE], self.ranks[base + R_NOW]
        if state == RUNNING and self.check_liveness and _gone(int(self.ranks[base + R_PID])):
            sch.v[sch.layout.rank(r) + R_STATE] = self.ranks[base + R_STATE] = state = DONE
        if state == UNSET:
            out = (-INF, False)
        elif state == DONE:
            out = (INF, False)
        elif state == RUNNING:
            out = (now, False)
        else:
            w = int(self.ranks[base + R_WAIT])
            pair = sch.layout.pair(w, r)
            rec = self.by_pair.get((w, r, int(sch.v[pair + 1])))
            if rec is not None and rec[M_RESOLVED]:
                out = (max(now, rec[M_TDELIVER]), False)
            elif rec is not None:
                ahead = self.res.routes.lookahead_s(w, r) if rec[M_FP] == self.res.fp else 0.0
                out = (max(now, rec[M_TSEND] + ahead), True)
            else:
                bw, stuck = self.of(w, visiting | {r})
                out = (max(now, bw), stuck)
        self.memo[r] = out
        return out


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie counts as exited)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
