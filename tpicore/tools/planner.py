"""`tpi plan`: predicted per-device memory and whether disk I/O can hide, before anything runs.

Owns the memory model (the paper's peak-memory formulas next to ours for this scheduler) and the time
estimates that feed the paper's steady conditions (tpicore.scheduler.check_steady) and a replay of our
scheduler (scheduler.simulate_window). Works from shapes only: a preset, an HF folder or shard folders
are read for their config and stored dtype, never for weights. Must not run the model.

Time model (per block, one device): load tau = stored bytes / disk bandwidth; compute t = float32 bytes
/ GEMV bandwidth (decode is a matrix-vector product per weight: machine.md measures 22-45 GB/s); one
allreduce t_ar is given (the network's business, see tpicore.comm and the emulator).

Memory model for our scheduler (bytes, per device):
  slabs     the float32 slabs the window's blocks occupy, replayed with scheduler.SlabPool over the
            cyclic block order with the window full (window 2: one Attn + one FFN block; larger windows:
            the worst case, see tpicore.scheduler; head chunks fit the smaller layer block)
  retained  ceil(L/T) FFN blocks with --retain-every T
  staging   8 MiB when weights are stored as bf16/f16 (the widening buffer)
  kv cache  2 x L x local KV heads x max_seq x head_dim x 4 (only positions used are touched)
  logits    the master's [T, V] float32 output row(s)
  baseline  the Python interpreter with NumPy and our modules (~30 MiB measured, machine.md: ~25)
The paper's formulas count parameters (x 4 bytes for FP32) and leave out the runtime; its measured
peaks (Table 2/6) are gamma ~1.1-2.1 times larger.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig, read_json
from tpicore.model.split import Layout, plan_layouts
from tpicore.runtime.window import (
    READ_BYTES,
    SlabPool,
    check_steady,
    retained_layers,
    simulate_window,
)
from tpicore.tools.synth import preset_config
from tpicore.weights.checkpoint import Checkpoint
from tpicore.weights.manifest import read_manifest

MiB = 1 << 20
GiB = 1 << 30
BASELINE_BYTES = 30 * MiB  # python + numpy + tpicore imported, nothing loaded
STORED_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "f32": 4, "f16": 2, "bf16": 2, "float32": 4, "float16": 2,
                "bfloat16": 2}


@dataclass(frozen=True)
class DeviceBlocks:
    """Sizes (float32 elements) of the blocks one device loads, from the config and its layout."""

    rank: int
    attn: int  # one Attn block: norm, q, k, v, o (+ biases)
    ffn: int  # one FFN block: norm, gate, up, down (+ biases)
    head_rows: int  # rows per LM-head chunk (master only; 0 on workers)
    head_chunks: int
    kv_heads: int  # local KV heads (cached per layer)


def device_blocks(cfg: ModelConfig, layout: Layout) -> DeviceBlocks:
    D, Dh = cfg.hidden_size, cfg.head_dim
    q, kv, f = layout.n_heads * Dh, layout.n_kv_heads * Dh, layout.n_ffn
    attn = D + q * D + 2 * kv * D + D * q
    if cfg.attention_bias:
        attn += q + 2 * kv
    if cfg.o_proj_bias:
        attn += D
    ffn = D + 3 * f * D + ((2 * f + D) if cfg.mlp_bias else 0)
    master = layout.rank == 0
    rows = max(1, min(attn, ffn) // D)  # engine.head_row_ranges: chunks fit the smaller layer block
    return DeviceBlocks(layout.rank, attn, ffn, rows if master else 0,
                        math.ceil(cfg.vocab_size / rows) if master else 0, layout.n_kv_heads)


def paper_peak_bytes(cfg: ModelConfig, layout: Layout, window: int) -> int:
    """The paper's peak-memory formula (parameters x 4 bytes), for this device's share p_i.

    worker: floor(w/2) (2 (1 + b/a) h^2 p_i + h) + floor((w+1)/2) (3 h s p_i + h)
    master: 2 h v + h at w = 2 (Pre and Post of consecutive tokens resident together); for w > 2 we add
    the w - 2 layer blocks that can sit beside them (the paper gives the master's formula at w = 2 only).
    """
    h, v, s = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    a, b = cfg.num_attention_heads, cfg.num_key_value_heads
    p_attn, p_ffn = layout.n_heads / a, layout.n_ffn / s

    def worker(w: int) -> float:
        return (w // 2) * (2 * (1 + b / a) * h * h * p_attn + h) + ((w + 1) // 2) * (3 * h * s * p_ffn + h)

    params = worker(window)
    if layout.rank == 0:
        params = max(params, 2 * h * v + h + worker(window - 2))
    return int(4 * params)


def predict_slab_elems(sizes: list[int], retained: list[bool], window: int) -> int:
    """Float32 elements the slabs settle on: SlabPool replayed over two cycles of the order."""
    pool = SlabPool(window)
    live: list[int] = []
    for step in range(2):
        for elems, kept in zip(sizes, retained):
            if kept:
                continue
            if len(live) == window:  # the oldest loaded block was used and released
                pool.give_back(live.pop(0))
            live.append(pool.take(elems)[0])
    return pool.total


@dataclass(frozen=True)
class DevicePrediction:
    rank: int
    attn_mb: float  # float32 MB of one block
    ffn_mb: float
    head_chunk_mb: float
    head_chunks: int
    paper_bytes: int  # the paper's formula
    ours_bytes: int  # our scheduler, everything included
    slab_bytes: int
    retained_bytes: int
    kv_cache_bytes: int
    resident_bytes: int  # all of this device's weights as float32 (no scheduler)
    tau_attn_s: float
    tau_ffn_s: float
    t_attn_s: float
    t_ffn_s: float
    steady: dict
    stall_per_token_s: float  # replayed stall in steady state
    token_compute_s: float  # this device's hold time per token (compute + allreduce)


def predict(cfg: ModelConfig, world_size: int, window: int, ratios: list[float] | None = None,
            retain_every: int = 0, stored_bytes: int = 4, max_seq: int = 2048, disk_gbps: float = 1.5,
            gemv_gbps: float = 25.0, allreduce_ms: float = 0.0, prompt_tokens: int = 1) -> list[DevicePrediction]:
    """Per-device memory and time predictions for `world_size` devices at `window`."""
    if window < 2:
        raise TpiError(f"--window: expected >= 2, got {window}")
    if disk_gbps <= 0 or gemv_gbps <= 0 or allreduce_ms < 0:
        raise TpiError("--disk-gbps and --gemv-gbps must be > 0, --allreduce-ms >= 0")
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    kept_layers = retained_layers(L, retain_every)
    t_ar = allreduce_ms / 1e3
    out = []
    for lay in plan_layouts(cfg, world_size, ratios):
        blk = device_blocks(cfg, lay)
        master = lay.rank == 0
        sizes = [blk.attn if kind == "attn" else blk.ffn for _ in range(L) for kind in ("attn", "ffn")]
        retained = [kind == "ffn" and layer in kept_layers for layer in range(L) for kind in ("attn", "ffn")]
        if master:
            rows = [min(blk.head_rows, V - lo) * D + (D if lo == 0 else 0) for lo in range(0, V, blk.head_rows)]
            sizes += rows
            retained += [False] * len(rows)
        slab = 4 * predict_slab_elems(sizes, retained, window)
        kept = 4 * blk.ffn * len(kept_layers)
        kv = 2 * L * blk.kv_heads * max_seq * cfg.head_dim * 4
        logits = 4 * V * prompt_tokens if master else 0
        staging = 2 * (READ_BYTES // 2) if stored_bytes < 4 else 0
        ours = BASELINE_BYTES + slab + kept + kv + logits + staging
        resident = 4 * (L * (blk.attn + blk.ffn) + ((2 if not cfg.tie_word_embeddings else 1) * V * D + D if master else 0))
        resident += BASELINE_BYTES + kv + logits

        def secs(elems: int, gbps: float, nbytes: int = 4) -> float:
            return elems * nbytes / (gbps * 1e9)

        tau_a, tau_f = secs(blk.attn, disk_gbps, stored_bytes), secs(blk.ffn, disk_gbps, stored_bytes)
        t_a, t_f = secs(blk.attn, gemv_gbps), secs(blk.ffn, gemv_gbps)
        steady = check_steady(t_a, t_f, t_ar, tau_a, tau_f, L, retain_every)
        holds = [(t_a if kind == "attn" else t_f) + t_ar for _ in range(L) for kind in ("attn", "ffn")]
        loads = [tau_a if kind == "attn" else tau_f for _ in range(L) for kind in ("attn", "ffn")]
        if master:
            holds += [secs(n, gemv_gbps) for n in sizes[2 * L:]]
            loads += [secs(n, disk_gbps, stored_bytes) for n in sizes[2 * L:]]
        stalls = simulate_window(holds, loads, window, retained)
        out.append(DevicePrediction(
            lay.rank, 4 * blk.attn / 1e6, 4 * blk.ffn / 1e6, 4 * blk.head_rows * D / 1e6, blk.head_chunks,
            paper_peak_bytes(cfg, lay, window), ours, slab, kept, kv, resident, tau_a, tau_f, t_a, t_f, steady,
            stalls[-1], sum(holds)))
    return out


# ---------------------------------------------------------------------------------------------
# Where the config comes from


def load_source(model: str | None, preset: str | None) -> tuple[dict, int | None, int | None, list[float] | None]:
    """(config dict, stored bytes per weight or None, world size of shard folders or None, their ratios)."""
    if preset:

        return preset_config(preset), None, None, None
    if not model:
        raise TpiError("--model or --preset is required")
    for d in (model, os.path.join(model, "rank-0")):
        if os.path.exists(os.path.join(d, "manifest.json")):

            man = read_manifest(d)
            dtypes = {t["dtype"] for t in man["tensors"].values()}
            return man["config"], max(STORED_BYTES[x] for x in dtypes), man["world_size"], man["ratios"]

    config = read_json(os.path.join(model, "config.json"))
    dtypes = {t.dtype for t in Checkpoint.from_dir(model).tensors.values()}
    return config, max(STORED_BYTES[x] for x in dtypes), None, None


# ---------------------------------------------------------------------------------------------
# CLI






