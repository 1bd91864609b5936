"""The predictor behind `tpi plan`: per-device memory and whether disk I/O can hide, before anything runs.

Layer: tools. Owns the memory model (the paper's peak-memory formulas next to ours for this scheduler)
and the time estimates that feed the paper's steady conditions (tpicore.runtime.window_model.check_steady)
and a replay of our scheduler (window_model.simulate_window). Works from shapes only (block sizes from
the table in tpicore.model.tensors): a preset, an HF folder or shard folders are read for their config
and stored dtype, never for weights. Must not run the model.

Time model (per block, one device): load tau = stored bytes / disk bandwidth; compute t = float32 bytes
/ GEMV bandwidth (decode is a matrix-vector product per weight: 22-45 GB/s measured on laptop CPUs); one
allreduce t_ar is given (the network's business, see tpicore.comm and the emulator).

Memory model for our scheduler (bytes, per device):
  slabs     the float32 slabs the window's blocks occupy, replayed with window_model.SlabPool over the
            cyclic block order with the window full (window 2: one Attn + one FFN block; larger windows:
            the worst case, see tpicore.runtime.window; head chunks fit the smaller layer block)
  retained  ceil(L/T) FFN blocks with --retain-every T
  staging   8 MiB when weights are stored as bf16/f16 (the widening buffer)
  kv cache  2 x L x local KV heads x max_seq x head_dim x 4 (only positions used are touched)
  logits    the master's [T, V] float32 output row(s)
  baseline  the Python interpreter with NumPy and our modules (~30 MiB measured)
The paper's formulas count parameters (x 4 bytes for FP32) and leave out the runtime; its measured
peaks (Table 2/6) are gamma ~1.1-2.1 times larger.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable

from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig, read_json
from tpicore.model.split import Layout, split_layouts
from tpicore.model.tensors import (
    FINAL_NORM,
    LM_HEAD,
    MASTER_TENSORS,
    block_elems,
    held_tensors,
)
from tpicore.runtime.window_model import (
    SlabPool,
    check_steady,
    retained_layers,
    simulate_window,
)
from tpicore.tools.synth.presets import preset_config
from tpicore.weights.checkpoint import Checkpoint, TensorInfo
from tpicore.weights.gguf import GGUFCheckpoint, hf_config_dict, is_gguf_path
from tpicore.weights.manifest import read_manifest
from tpicore.weights.quant import GGML_TYPES, is_block_quantized
from tpicore.weights.reader import READ_BYTES

MiB = 1 << 20
GiB = 1 << 30
BASELINE_BYTES = 30 * MiB  # python + numpy + tpicore imported, nothing loaded
# bytes per stored weight (bits per weight / 8), by tag (F32, BF16, Q4_K, ...) or `--dtype` name (f32, q4_k, ...)
STORED_BYTES: dict[str, float] = {k: t.bits_per_weight / 8 for t in GGML_TYPES.values() for k in (t.name, t.name.lower())}
# How fast the loader dequantizes (weights.quant.dequantize, one core, 1024 x 4096 tensors, best of several
# runs on the shared 2-core dev box, elements per second); f32/f16/bf16 cost nothing here (f16/bf16
# widening runs at memory speed).
DEQUANT_ELEMS_PER_S: dict[str, float] = {"Q8_0": 720e6, "Q4_0": 334e6, "Q4_1": 108e6, "Q5_0": 114e6,
                                         "Q5_1": 86e6, "Q4_K": 208e6, "Q5_K": 80e6, "Q6_K": 146e6}


@dataclass(frozen=True)
class StoredWeights:
    """How a model's layer weights are stored: bytes per weight (bits / 8; a mix such as Q4_K_M averages
    over the elements) and the loader's dequantization speed (0: no dequantization)."""

    bytes_per_weight: float
    dequant_elems_per_s: float = 0.0

    @classmethod
    def of_dtype(cls, name: str) -> "StoredWeights":
        tag = name.upper()
        return cls(STORED_BYTES[tag], DEQUANT_ELEMS_PER_S.get(tag, 0.0))

    @classmethod
    def of_tensors(cls, tensors: list[tuple[str, tuple[int, ...], int]]) -> "StoredWeights":
        """From (dtype tag, shape, stored bytes) of a model's 2-D weights."""
        elems = [math.prod(shape) for _, shape, _ in tensors]
        nbytes = sum(n for _, _, n in tensors)
        dq_s = sum(e / DEQUANT_ELEMS_PER_S[t] for (t, _, _), e in zip(tensors, elems) if is_block_quantized(t))
        total = max(sum(elems), 1)
        return cls(nbytes / total, total / dq_s if dq_s else 0.0)


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
    attn, ffn = block_elems(cfg, layout, "attn"), block_elems(cfg, layout, "ffn")
    master = layout.rank == 0
    head_row = MASTER_TENSORS[LM_HEAD].shape(cfg, layout)[1]  # elements of one vocabulary row
    rows = max(1, min(attn, ffn) // head_row)  # weights.store.head_row_ranges: chunks fit the smaller layer block
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
            retain_every: int = 0, stored_bytes: float = 4, max_seq: int = 2048, disk_gbps: float = 1.5,
            gemv_gbps: float = 25.0, allreduce_ms: float = 0.0, prompt_tokens: int = 1,
            dequant_elems_per_s: float = 0.0) -> list[DevicePrediction]:
    """Per-device memory and time predictions for `world_size` devices at `window`. `stored_bytes`: bytes
    per weight on disk (fractional for ggml types: Q4_K 0.5625); a block's load time tau is its stored bytes
    over the disk bandwidth plus, for quantized weights, its elements over `dequant_elems_per_s`."""
    if window < 2:
        raise TpiError(f"--window: expected >= 2, got {window}")
    if disk_gbps <= 0 or gemv_gbps <= 0 or allreduce_ms < 0:
        raise TpiError("--disk-gbps and --gemv-gbps must be > 0, --allreduce-ms >= 0")
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    kept_layers = retained_layers(L, retain_every)
    t_ar = allreduce_ms / 1e3
    out = []
    for lay in split_layouts(cfg, world_size, ratios):
        blk = device_blocks(cfg, lay)
        master = lay.rank == 0
        head_row = MASTER_TENSORS[LM_HEAD].shape(cfg, lay)[1]
        norm = math.prod(MASTER_TENSORS[FINAL_NORM].shape(cfg, lay))  # goes with the first head chunk
        sizes = [blk.attn if kind == "attn" else blk.ffn for _ in range(L) for kind in ("attn", "ffn")]
        retained = [kind == "ffn" and layer in kept_layers for layer in range(L) for kind in ("attn", "ffn")]
        if master:
            rows = [min(blk.head_rows, V - lo) * head_row + (norm if lo == 0 else 0) for lo in range(0, V, blk.head_rows)]
            sizes += rows
            retained += [False] * len(rows)
        slab = 4 * predict_slab_elems(sizes, retained, window)
        kept = 4 * blk.ffn * len(kept_layers)
        kv = 2 * L * blk.kv_heads * max_seq * cfg.head_dim * 4
        logits = 4 * V * prompt_tokens if master else 0
        staging = 2 * (READ_BYTES // 2) if stored_bytes < 4 else 0
        ours = BASELINE_BYTES + slab + kept + kv + logits + staging
        master_elems = sum(math.prod(shape) for _, shape in held_tensors(cfg, lay, layers=[]))  # 0 on workers
        resident = 4 * (L * (blk.attn + blk.ffn) + master_elems)
        resident += BASELINE_BYTES + kv + logits

        def secs(elems: int, gbps: float, nbytes: float = 4) -> float:
            return elems * nbytes / (gbps * 1e9)

        def load_s(elems: int) -> float:  # read the stored bytes, then dequantize them
            return secs(elems, disk_gbps, stored_bytes) + (elems / dequant_elems_per_s if dequant_elems_per_s else 0.0)

        tau_a, tau_f = load_s(blk.attn), load_s(blk.ffn)
        t_a, t_f = secs(blk.attn, gemv_gbps), secs(blk.ffn, gemv_gbps)
        steady = check_steady(t_a, t_f, t_ar, tau_a, tau_f, L, retain_every)
        holds = [(t_a if kind == "attn" else t_f) + t_ar for _ in range(L) for kind in ("attn", "ffn")]
        loads = [tau_a if kind == "attn" else tau_f for _ in range(L) for kind in ("attn", "ffn")]
        if master:
            holds += [secs(n, gemv_gbps) for n in sizes[2 * L:]]
            loads += [load_s(n) for n in sizes[2 * L:]]
        stalls = simulate_window(holds, loads, window, retained)
        out.append(DevicePrediction(
            lay.rank, 4 * blk.attn / 1e6, 4 * blk.ffn / 1e6, 4 * blk.head_rows * head_row / 1e6, blk.head_chunks,
            paper_peak_bytes(cfg, lay, window), ours, slab, kept, kv, resident, tau_a, tau_f, t_a, t_f, steady,
            stalls[-1], sum(holds)))
    return out


# ---------------------------------------------------------------------------------------------
# Where the config comes from


def load_source(model: str | None, preset: str | None) -> tuple[dict, StoredWeights | None, int | None,
                                                                 list[float] | None]:
    """(config dict, how weights are stored or None, world size of shard folders or None, their ratios).
    Sources: a preset, a GGUF file, shard folders (their manifests), or an HF folder."""
    if preset:
        return preset_config(preset), None, None, None
    if not model:
        raise TpiError("--model or --preset is required")
    if is_gguf_path(model):
        ckpt = GGUFCheckpoint(model)
        return hf_config_dict(ckpt.cfg), _stored(ckpt.tensors.values()), None, None
    for d in (model, os.path.join(model, "rank-0")):
        if os.path.exists(os.path.join(d, "manifest.json")):
            man = read_manifest(d)
            weights = [(t.dtype, t.shape, t.nbytes) for t in man.tensors.values() if len(t.shape) == 2]
            return man.config, StoredWeights.of_tensors(weights), man.world_size, man.ratios
    config = read_json(os.path.join(model, "config.json"))
    return config, _stored(Checkpoint.from_dir(model).tensors.values()), None, None


def _stored(infos: Iterable[TensorInfo]) -> StoredWeights:
    return StoredWeights.of_tensors([(i.dtype, i.shape, i.nbytes) for i in infos if len(i.shape) == 2])
