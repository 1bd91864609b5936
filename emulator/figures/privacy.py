"""The privacy experiment's figure: prompt tokens an honest-but-curious worker recovers, and latency,
against `--private-layers K`.

Layer: figures (imports emulator.figures.data / style and emulator.results.privacy_record). One function,
(records, paper tables, output path) -> writes the PNG or raises NoData. Must not read files.

    figure    point           measurements
    privacy   private_layers  recovery.{nearest, linear, mlp, search}, ttft_s, token_latency_s
"""

from __future__ import annotations

from pathlib import Path

from emulator.figures.data import NoData
from emulator.figures.style import finish, new_figure
from emulator.results.privacy_record import PrivacyRecord

ATTACKS = (("nearest", "nearest embedding row"), ("linear", "linear inversion (ridge)"),
           ("mlp", "MLP inversion"), ("search", "search with the weights (re-run K layers)"))


def privacy(records: list, tables: dict, out: Path) -> None:
    recs = sorted((r for r in records if isinstance(r, PrivacyRecord) and r.error is None),
                  key=lambda r: r.private_layers)
    if not recs:
        raise NoData("no successful privacy lines")
    ks = [r.private_layers for r in recs]
    fig, axes = new_figure(1, 2, 11.0, 4.2)
    ax = axes[0][0]
    for key, label in ATTACKS:
        have = [r for r in recs if key in r.recovery]
        if have:
            ax.plot([r.private_layers for r in have], [100 * r.recovery[key] for r in have], "-o", label=label)
    chance = 100.0 / int(recs[0].config["model"]["vocab"])
    ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("private layers K (run on the master alone)")
    ax.set_ylabel("held-out prompt tokens recovered (%)")
    ax.set_ylim(-2, 102)
    ax.set_xticks(ks)
    ax.legend(fontsize=8, loc="center right")  # between the search line (top) and the others (bottom)
    ax.set_title("what a worker can reconstruct", fontsize=10)
    ax = axes[0][1]
    timed = [r for r in recs if r.ttft_s is not None]
    ax.plot([r.private_layers for r in timed], [1e3 * r.ttft_s for r in timed], "-o", label="TTFT")
    ax.plot([r.private_layers for r in timed], [1e3 * r.token_latency_s for r in timed], "-s", label="per token")
    ax.set_xlabel("private layers K")
    ax.set_ylabel("latency (ms, median)")
    ax.set_xticks(ks)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(f"cost of K ({recs[0].config['latency']['devices']} devices)", fontsize=10)
    finish(fig, out, "Honest privacy: prompt recovery and latency vs --private-layers K", recs,
           "Ours (issue 10); the paper has no such measurement. K = 0 is today's split (the worker "
           "receives the embedding rows). Synthetic random weights: see the README for what that means.")
