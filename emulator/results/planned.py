"""The planner's a-priori stall prediction for a run's resolved config: what `tpi plan` says before it runs.

Layer: results (imports emulator.config's topology and collective model, emulator.results.record's
RunSetting, and tpicore.tools.predictor). Used by emulator/run/experiments.py (before each windowed point
runs; the figure reads it from the line's `prediction`) and by the README generator (emulator/results/
readme_blocks.py, for lines written before predictions were recorded: the same function of the same config,
so still a priori). Must not read measured times: nothing here looks at a line's measurements.

Inputs, all from the config (none measured):
    model           the preset's (or checkpoint's) dims with the config's layer count, stored dtype
    shares          split_layouts over the devices with the config's ratios (equal, speed, list)
    disk            each device's disk_read_mbps (no prediction when a device's disk is not modelled)
    compute         tpi plan's default GEMV rate, 25 GB/s of float32 weights, times the device's speed
                    (the virtual clock divides CPU time by it)
    allreduce       the link model on idle links: star, the slowest worker's route to the master and back
                    for one decode payload (hidden x 4 bytes), tree / ring: hops x the slowest route
Output: {device: the replayed stall per token in steady state} (predictor.predict's stall_per_token_s).
"""

from __future__ import annotations

from typing import Any, Mapping

from emulator.config.collective_model import hops
from emulator.config.topology import topology_from_dict
from emulator.results.record import RunSetting
from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.tools.predictor import STORED_BYTES, predict
from tpicore.tools.synth.presets import PRESETS, config_from_file

GEMV_GBPS = 25.0  # tpi plan's default (--gemv-gbps)
PLANNED_MODES = ("tpi",)  # the window scheduler over tensor-parallel shares


def allreduce_s(config: Mapping[str, Any], payload_bytes: int) -> float:
    """One decode allreduce on idle links (the link model, no queueing)."""
    topo = topology_from_dict(config["topology"]["doc"], "results: config.topology.doc")
    n = len(topo.devices)
    if n < 2:
        return 0.0
    algo = config["options"]["allreduce"]
    if algo == "star":
        return max(topo.idle_delay_s(w, 0, payload_bytes) + topo.idle_delay_s(0, w, payload_bytes)
                   for w in range(1, n))
    worst = max(topo.idle_delay_s(a, b, payload_bytes) for a in range(n) for b in range(n) if a != b)
    return hops(algo, n) * worst


def model_dims(config: Mapping[str, Any]) -> dict | None:
    """The HF config of the model the config names, with its layer count; None for an unknown source."""
    model = config["model"]
    if model.get("synth"):
        dims = dict(PRESETS[model["synth"]])
        if model.get("layers"):
            dims["num_hidden_layers"] = model["layers"]
        return dims
    if model.get("path"):
        try:
            return config_from_file(model["path"])
        except TpiError:
            return None
    return None


def planned_stall(config: Mapping[str, Any]) -> dict[str, float] | None:
    """{device: predicted stall per token (s)} for a windowed tpi run of this resolved config; None when
    the run has no window, is not tpi, or a device's disk is not modelled."""
    if "topology" not in config:
        return None
    s = RunSetting.from_config(dict(config))
    if s.mode not in PLANNED_MODES or not s.window or any(d.disk_read_mbps is None for d in s.devices):
        return None
    dims = model_dims(config)
    if dims is None:
        return None
    try:
        cfg = ModelConfig.from_dict(dims, source="results: config.model")
        ar_s = allreduce_s(config, 4 * cfg.hidden_size)
    except TpiError:
        return None
    ratios = config["options"]["ratios"]
    shares = None if ratios == "equal" or s.world_size == 1 else (
        [d.speed for d in s.devices] if ratios == "speed" else [float(r) for r in ratios])
    dtype = s.model.dtype or "f32"
    stored = STORED_BYTES.get(dtype.upper(), 4.0)
    out = {}
    for rank, dev in enumerate(s.devices):
        preds = predict(cfg, s.world_size, s.window, shares, s.retain_every, stored, max_seq=64,
                        disk_gbps=dev.disk_read_mbps / 8e3, gemv_gbps=GEMV_GBPS * dev.speed,
                        allreduce_ms=ar_s * 1e3)
        out[dev.name] = preds[rank].stall_per_token_s
    return out
