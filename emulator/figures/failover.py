"""The failover figure (issue 15): a device lost mid-generation, the recovery's split and the token latencies
around it.

Layer: figures (imports emulator.figures.data / style, emulator.results.record). Must not read files.

    panel   x                                          y
    (a)     each point (model layers, N, window,       the recovery's host seconds, stacked: detect,
            slices)                                    re-plan, load, rebuild (beside the point's TTFT)
    (b)     token index relative to the first token    each token's latency (token 1: TTFT), one line per
            that waited for the recovery (0)           point: colour N, line style slices, marker window
"""

from __future__ import annotations

from pathlib import Path

from emulator.figures.data import NoData
from emulator.figures.style import finish, new_figure
from emulator.results.record import RunRecord

PARTS = (("detect_s", "detect", "C3"), ("replan_s", "re-plan", "C1"), ("load_s", "load slices", "C0"),
         ("rebuild_s", "rebuild KV (replay)", "C2"))


def point_label(rec: RunRecord) -> str:
    s = rec.setting
    slices = rec.config.get("options", {}).get("slices", "local")
    return f"L{s.model.layers} N={s.world_size}\nw={s.window or '-'} {slices}"


def latencies(rec: RunRecord) -> list[float]:
    """Each token's latency, token 1's being the TTFT."""
    t = rec.timings
    return ([t.ttft_s] if t.ttft_s is not None else []) + list(t.token_latencies_s)


def failover(records: list[RunRecord], tables: dict, out: Path) -> None:
    rows = [r for r in records if not r.error and r.recoveries]
    if not rows:
        raise NoData("no completed run with a recovery (results lines with `recoveries`)")
    rows.sort(key=lambda r: (r.setting.model.layers or 0, r.setting.world_size, r.setting.window or 0,
                             r.config.get("options", {}).get("slices", "")))
    fig, axes = new_figure(1, 2, 16, 6)
    ax = axes[0][0]
    xs = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key, label, color in PARTS:
        vals = [sum(getattr(rc, key) for rc in r.recoveries) for r in rows]
        ax.bar(xs, vals, 0.7, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(xs, [r.ttft_s for r in rows], marker="_", s=300, color="k", zorder=3, label="TTFT (same run)")
    ax.set_xticks(xs)
    ax.set_xticklabels([point_label(r) for r in rows], fontsize=6, rotation=90)
    ax.set_ylabel("seconds (host)")
    ax.set_title("(a) recovery time, from the loss to the regrouped step", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[0][1]
    sizes = sorted({r.setting.world_size for r in rows})
    for r in rows:
        lat = latencies(r)
        at = r.recoveries[0].token
        color = f"C{sizes.index(r.setting.world_size)}"
        slices = r.config.get("options", {}).get("slices", "local")
        ax.plot([i + 1 - at for i in range(len(lat))], lat, "-" if slices == "local" else "--",
                marker="o" if r.setting.window is None else "s", color=color, ms=3, lw=1, alpha=0.8)
    for i, n in enumerate(sizes):
        ax.plot([], [], "-", color=f"C{i}", label=f"N = {n} (N - 1 after)")
    ax.plot([], [], "k-", label="slices: local copy")
    ax.plot([], [], "k--", label="slices: sent by rank 0")
    ax.plot([], [], "ko", ls="", label="no window")
    ax.plot([], [], "ks", ls="", label="window w = 2")
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("token, relative to the first one produced after the loss")
    ax.set_ylabel("token latency (s; token 1: TTFT)")
    ax.set_title("(b) token latency around the loss", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    finish(fig, out, "Failover: a worker lost mid-generation, the survivors re-split the model and go on", rows,
           "ours (no paper number: the paper's system aborts on a lost device). Recovery split from "
           "tpicore.dist.elastic's Recovery record (host seconds: detection, probing the survivors and the "
           "plan, every survivor's new slice and the master's, replaying the prompt and the tokens so far); "
           "the token at 0 carries it. Greedy tokens after the loss equal an uninterrupted run on N - 1.")
