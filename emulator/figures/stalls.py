"""The stall-prediction figure: predicted stall per token against the measured one, per model and setting.

Layer: figures (imports emulator.figures.data / style, emulator.results.record, tpicore.runtime.window_model
for the window's replay). Must not read files.

    figure            point keys / config                     measurements
    stall_prediction  paper model, the rest of the point as   devices' window steps (stall_s; else the
                      the setting                             time split's stall_s / tokens), the line's
                                                              prediction (else the window's steady.measured
                                                              block times, replayed)
"""

from __future__ import annotations

import statistics
from pathlib import Path

from emulator.figures.data import NoData, aggregate, model_name, time_unit
from emulator.figures.style import bars, finish, new_figure, series_label
from emulator.results.record import RunRecord
from tpicore.runtime.window_model import retained_layers, simulate_window


def measured_stall(rec: RunRecord) -> float | None:
    """Stall seconds per token on the device that stalled most: the mean over the window scheduler's
    decode steps (the window's steps after the first, which also prefills), or, on a line without window
    steps, the run's time split stall_s / tokens."""
    per_device = []
    for d in rec.devices.values():
        if d.window is not None and d.window.steps:
            steps = d.window.steps[1:] or d.window.steps
            per_device.append(statistics.mean(s.stall_s for s in steps))
    if per_device:
        return max(per_device)
    tokens = len(rec.timings.tokens)
    stalls = [d.time_split.stall_s for d in rec.devices.values() if d.time_split is not None]
    return max(stalls) / tokens if stalls and tokens else None


def predicted_stall(rec: RunRecord) -> tuple[float, str] | None:
    """(stall per token, how it was predicted): the planner's a-priori prediction when the line carries
    one (`prediction`, {device: seconds}); else the scheduler's replay (window_model.simulate_window) on
    this run's measured per-block times (the window's steady.measured: t_attn, t_ffn, t_ar, tau_attn,
    tau_ffn), the device that stalls most."""
    if rec.prediction:
        return max(rec.prediction.values()), "planner"
    s = rec.setting
    layers = s.model.layers
    if not s.window or not layers:
        return None
    kept = retained_layers(layers, s.retain_every)
    retained = [kind == "ffn" and layer in kept for layer in range(layers) for kind in ("attn", "ffn")]
    best = None
    for d in rec.devices.values():
        if d.window is None or d.window.steady is None:
            continue
        m = d.window.steady["measured"]
        hold = [m["t_attn"] + m["t_ar"], m["t_ffn"] + m["t_ar"]] * layers
        load = [m["tau_attn"], m["tau_ffn"]] * layers
        stall = simulate_window(hold, load, s.window, retained)[-1]
        best = stall if best is None else max(best, stall)
    return (best, "replay of measured block times") if best is not None else None


def steady_verdict(rec: RunRecord) -> str:
    """'tight', 'loose' or 'neither': the paper's conditions as the scheduler checked them (worst device);
    'unknown' when no device checked them."""
    verdicts = [d.window.steady for d in rec.devices.values() if d.window is not None and d.window.steady]
    if not verdicts:
        return "unknown"
    if all(v["tight"] for v in verdicts):
        return "tight"
    return "loose" if all(v["loose"] for v in verdicts) else "neither"


def stall_prediction(records: list[RunRecord], tables: dict, out: Path) -> None:
    """Predicted stall per token against the measured one, per model and setting, marked by which of
    the paper's steady conditions held."""
    rows = []
    for p in aggregate(records):
        meas = [m for m in (measured_stall(r) for r in p.ok) if m is not None]
        preds = [x for x in (predicted_stall(r) for r in p.ok) if x is not None]
        if not meas or not preds:
            continue
        label = model_name(p.rec)
        rest = series_label(p.point, {k for k in p.point if k.endswith(("paper_model", "model", "synth"))})
        rows.append((f"{label}\n{rest}" if rest != "ours" and rest != label else label,
                     statistics.median(x for x, _ in preds), statistics.median(meas), preds[-1][1],
                     steady_verdict(p.rec)))
    if not rows:
        raise NoData("no completed runs with both a measured stall (window steps or time_split) and a "
                     "prediction (prediction.stall_per_token_s, or window[*].steady.measured to replay)")
    fig, axes = new_figure(1, 2, 14, 5.5)
    ax = axes[0][0]
    top = max(max(r[1], r[2]) for r in rows) * 1.1 or 1.0
    ax.plot([0, top * 1e3], [0, top * 1e3], "--", color="0.5", label="measured = predicted")
    markers = {"tight": "o", "loose": "^", "neither": "x", "unknown": "s"}
    for verdict, marker in markers.items():
        mine = [r for r in rows if r[4] == verdict]
        if mine:
            ax.scatter([r[1] * 1e3 for r in mine], [r[2] * 1e3 for r in mine], marker=marker, color="C3",
                       label=f"steady condition: {verdict}" if verdict != "unknown" else "conditions not recorded")
    for label, pred, meas, _, _ in rows:
        ax.annotate(label.replace("\n", " "), (pred * 1e3, meas * 1e3), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    how = sorted({r[3] for r in rows})
    ax.set_xlabel(f"predicted stall per token (ms; {', '.join(how)})")
    ax.set_ylabel(f"measured stall per token ({time_unit(records, 'ms')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    never = [False] * len(rows)
    bars(axes[0][1], [r[0] for r in rows], [("predicted", "C0", [r[1] * 1e3 for r in rows], never),
                                            ("ours: measured", "C3", [r[2] * 1e3 for r in rows], never)],
         "stall per token (ms)", "per model and setting")
    axes[0][1].legend(fontsize=8)
    finish(fig, out, "Stall prediction: the steady conditions against measured stalls", records,
           "predicted: tpicore.planner's a-priori replay of the window when the line carries it, else the same "
           "replay (scheduler.simulate_window) on the run's measured block times; the device that stalls most. "
           "measured: mean stall of the scheduler's decode steps, max over devices, median over runs. Markers: "
           "which of the paper's steady conditions (tight / loose) held. The paper states the conditions but "
           "measures no stall.")
