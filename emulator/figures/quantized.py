"""The quantized experiment's figure: TTFT, s/token and peak memory per device of the 70B shapes with weights
stored as f32 / bf16 / q8_0 / q4_k, beside the paper's f32 Table 1 (scheduler on).

Layer: figures (imports emulator.figures.data / style and emulator.results.record). One function,
(records, paper tables, output path) -> writes the PNG or raises NoData. Must not read files.

    figure      point                      measurements
    quantized   model.synth, model.dtype   ttft_s, token_latency_s, peak memory (per device, max)
"""

from __future__ import annotations

from pathlib import Path

from emulator.figures.data import NoData, aggregate, model_name
from emulator.figures.style import bars, finish, new_figure
from emulator.results.record import RunRecord

DTYPES = ("f32", "bf16", "q8_0", "q4_k")
COLORS = {"paper f32": "0.6", "f32": "C0", "bf16": "C1", "q8_0": "C2", "q4_k": "C3"}


def quantized(records: list[RunRecord], tables: dict, out: Path) -> None:
    points = aggregate(records)
    if not points:
        raise NoData("no runs")
    models = list(dict.fromkeys(model_name(p.rec) for p in points))
    paper = (tables.get("table1") or {}).get("scheduler_on") or {}

    def ours(model: str, dtype: str):
        sel = [p for p in points if model_name(p.rec) == model and p.rec.setting.model.dtype == dtype]
        return sel[-1] if sel else None

    mu, mscale = "GB", 1e9  # the paper prints GB
    fig, axes = new_figure(1, 3, 15, 4.6)
    metrics = (("TTFT", 0, lambda p: p.ttft_s, "s"), ("token latency", 1, lambda p: p.token_latency_s, "s/token"),
               ("peak memory per device", 2, lambda p: p.peak_bytes / mscale if p.peak_bytes else None, mu))
    for col, (name, idx, get, unit) in enumerate(metrics):
        series = []
        vals = [(paper.get(m) or [None] * 3)[idx] for m in models]
        series.append(("paper (Table 1, f32)", COLORS["paper f32"], vals, [False] * len(models)))
        for dt in DTYPES:
            got = [ours(m, dt) for m in models]
            series.append((f"ours: {dt}", COLORS[dt], [get(p) if p and not p.failed else None for p in got],
                           [p.status if p else "not run" for p in got]))
        bars(axes[0][col], models, series, f"{name} ({unit})", name)
    axes[0][0].legend(fontsize=7)
    finish(fig, out, "Quantized weights through the window: 70B shapes, 8 devices, w = 2, 2 GB/s disks", records,
           "Ours (issue 12); the paper ran f32 only (grey; its memory in GB). q8_0 / q4_k: the shards hold ggml "
           "blocks, the loader reads only those bytes and dequantizes each block on load (NumPy, one core), "
           "charged on the loader's virtual timeline. Hatched 'not run': the point has no result line.")
