"""`tpi plan`: print the predictor's per-device memory and stall predictions. Argparse and printing only."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from tpicore.cli import checks
from tpicore.errors import TpiError
from tpicore.model.config import ModelConfig
from tpicore.model.split import parse_ratios
from tpicore.tools.predictor import (
    STORED_BYTES,
    GiB,
    MiB,
    StoredWeights,
    load_source,
    predict,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint folder, a GGUF file, or shard folders from `tpi shard` / "
                                     "`tpi synth --devices`")
    src.add_argument("--preset", help="an architecture preset of `tpi synth` (e.g. llama-2-70b)")
    p.add_argument("--devices", type=int, default=None, help="number of devices (default: the shards', else 1)")
    p.add_argument("--ratios", help="per-device share, e.g. 3,2,2,1 (default equal)")
    p.add_argument("--window", type=int, default=2, help="sliding window of resident blocks (default 2)")
    p.add_argument("--retain-every", type=int, default=0, help="keep one FFN block in every T resident")
    p.add_argument("--dtype", choices=sorted({k for k in STORED_BYTES if k.islower()}),
                   help="stored weight type, e.g. bf16, q8_0, q4_k (default: the checkpoint's; presets: bf16)")
    p.add_argument("--dequant-melems", type=float, default=None,
                   help="loader dequantization speed, million elements/s (default: measured per ggml type)")
    p.add_argument("--disk-gbps", type=float, default=1.5, help="disk read bandwidth, GB/s (default 1.5)")
    p.add_argument("--gemv-gbps", type=float, default=25.0,
                   help="float32 weight bytes per second a device's GEMV streams, GB/s (default 25)")
    p.add_argument("--allreduce-ms", type=float, default=0.0, help="time of one allreduce, ms (default 0)")
    p.add_argument("--max-seq", type=int, default=2048, help="context length the KV cache holds (default 2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _mb(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n < 10 * GiB else f"{n / GiB:,.1f} GiB"


def check_flags(args: argparse.Namespace) -> None:
    """One error line for a bad number, before anything is read."""
    checks.integer("--devices", args.devices, 1)
    checks.integer("--window", args.window, 2)
    checks.integer("--retain-every", args.retain_every, 0)
    checks.integer("--max-seq", args.max_seq, 1)
    checks.number("--disk-gbps", args.disk_gbps, lo=0, lo_open=True)
    checks.number("--gemv-gbps", args.gemv_gbps, lo=0, lo_open=True)
    checks.number("--allreduce-ms", args.allreduce_ms, lo=0)
    checks.number("--dequant-melems", args.dequant_melems, lo=0, lo_open=True)
    if args.model is not None and not os.path.exists(args.model):
        raise TpiError(f"--model: {args.model}: not found")


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    config, stored, shard_n, shard_ratios = load_source(args.model, args.preset)
    cfg = ModelConfig.from_dict(config, source=args.model or args.preset)
    n = args.devices or shard_n or 1
    if shard_n and n != shard_n:
        raise TpiError(f"--devices: the shards are for {shard_n} devices, not {n}")
    ratios = parse_ratios(args.ratios, n) if args.ratios else shard_ratios
    weights = StoredWeights.of_dtype(args.dtype) if args.dtype else (stored or StoredWeights.of_dtype("bf16"))
    dequant = weights.dequant_elems_per_s if args.dequant_melems is None else args.dequant_melems * 1e6
    stored = round(weights.bytes_per_weight, 4)
    preds = predict(cfg, n, args.window, ratios, args.retain_every, stored, args.max_seq, args.disk_gbps,
                    args.gemv_gbps, args.allreduce_ms, dequant_elems_per_s=dequant)
    if args.json:
        print(json.dumps({"devices": n, "window": args.window, "retain_every": args.retain_every,
                          "stored_bytes_per_weight": stored, "dequant_elems_per_s": dequant,
                          "per_device": [asdict(p) for p in preds]}))
        return 0
    name = args.preset or os.path.basename(os.path.normpath(args.model))
    print(f"{name}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
          f"({cfg.num_key_value_heads} KV), FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}; {n} devices, "
          f"window {args.window}{f', retain every {args.retain_every}' if args.retain_every else ''}, "
          f"weights stored with {stored:g} bytes each"
          + (f", dequantized at {dequant / 1e6:.0f} M/s" if dequant else ""))
    print(f"{'rank':>4}  {'Attn':>9}  {'FFN':>9}  {'head chunks':>16}  {'paper formula':>13}  {'ours':>9}"
          f"  {'no window':>10}")
    for p in preds:
        head = f"{p.head_chunks} x {p.head_chunk_mb:.0f} MB" if p.head_chunks else "-"
        print(f"{p.rank:>4}  {p.attn_mb:>6.0f} MB  {p.ffn_mb:>6.0f} MB  {head:>16}  {_mb(p.paper_bytes):>13}"
              f"  {_mb(p.ours_bytes):>9}  {_mb(p.resident_bytes):>10}")
    print("ours = slabs + retained blocks + KV cache (max-seq) + logits + staging + ~30 MiB interpreter; "
          "the paper's formula counts parameters only (x4 bytes)")
    for p in preds[:2] if n > 1 else preds:
        role = "master" if p.rank == 0 else "worker"
        s = p.steady
        print(f"rank {p.rank} ({role}) at {args.disk_gbps:g} GB/s disk, {args.gemv_gbps:g} GB/s GEMV, "
              f"allreduce {args.allreduce_ms:g} ms: tau_attn {p.tau_attn_s * 1e3:.1f} ms, tau_ffn "
              f"{p.tau_ffn_s * 1e3:.1f} ms, t_attn {p.t_attn_s * 1e3:.1f} ms, t_ffn {p.t_ffn_s * 1e3:.1f} ms")
        verdict = "I/O hides (tight condition holds)" if s["tight"] else \
            "I/O hides on average (loose condition holds)" if s["loose"] else "I/O cannot hide"
        print(f"  {verdict}; tight {'yes' if s['tight'] else 'no'}, loose {'yes' if s['loose'] else 'no'}"
              + (f" -- {'; '.join(s['failed'])}" if s["failed"] else ""))
        print(f"  replayed stall {p.stall_per_token_s:.3f} s per token on {p.token_compute_s:.3f} s of compute"
              f" + allreduce")
    return 0
