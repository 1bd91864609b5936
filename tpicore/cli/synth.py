"""`tpi synth`: write a synthetic checkpoint or per-device shard folders. Argparse and printing only."""

from __future__ import annotations

import argparse
import time

from tpicore.cli import checks
from tpicore.errors import TpiError
from tpicore.model.split import parse_ratios
from tpicore.tools.synth.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    param_count,
    write_checkpoint,
)
from tpicore.tools.synth.gguf import write_synthetic_gguf
from tpicore.tools.synth.init import DTYPES
from tpicore.tools.synth.presets import PRESETS, resolve_arch
from tpicore.tools.synth.unique import NOTE, write_unique_shards
from tpicore.units import parse_bytes
from tpicore.weights.quant import BLOCK_TAGS

FLOAT_DTYPES = list(DTYPES)  # what an HF safetensors folder can hold
ALL_DTYPES = FLOAT_DTYPES + [t.lower() for t in BLOCK_TAGS]


def _size(text: str) -> int:
    """--max-shard-bytes: '2GiB', '500MB', '1048576' -> bytes (argparse reports a bad value)."""
    try:
        return parse_bytes(text, "SIZE")
    except TpiError as e:  # argparse names the flag itself
        raise argparse.ArgumentTypeError(str(e).removeprefix("SIZE: ")) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH",
                        help=f"a preset ({', '.join(PRESETS)}) or a path to a config.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created), or FILE.gguf")
    parser.add_argument("--layers", type=int, metavar="N", help="override num_hidden_layers")
    parser.add_argument("--dtype", choices=ALL_DTYPES, default="f32",
                        help="weight type (default f32); ggml types (q8_0, q4_k, ...) need --format gguf or --devices")
    parser.add_argument("--format", choices=("safetensors-folder", "gguf"), default="safetensors-folder",
                        help="an HF folder (or shard folders with --devices; default), or one GGUF file")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint folder")
    parser.add_argument("--max-shard-bytes", type=_size, default=DEFAULT_MAX_SHARD_BYTES,
                        metavar="SIZE", help="start a new .safetensors file past this size (default 2GiB)")
    parser.add_argument("--shards", type=int, metavar="N", help="force about N weight files (for tests)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    huge = parser.add_argument_group("huge shapes on a small disk (per-device shard folders)")
    huge.add_argument("--devices", type=int, metavar="N", help="write N per-device shard folders directly")
    huge.add_argument("--unique-layers", type=int, metavar="K",
                      help="store K distinct layers and map the rest onto them (needs --devices)")
    huge.add_argument("--ratios", help="per-device share with --devices, e.g. 3,2,2,1")


def run(args: argparse.Namespace) -> int:
    checks.integer("--seed", args.seed, 0, 2**63 - 1)
    checks.integer("--shards", args.shards, 1)
    checks.integer("--devices", args.devices, 1)
    checks.integer("--unique-layers", args.unique_layers, 1)
    checks.needs("--ratios", args.ratios is not None, "--devices N > 1", (args.devices or 1) > 1)
    config = resolve_arch(args.arch)
    if args.layers is not None:
        if args.layers < 1:
            raise TpiError(f"--layers must be at least 1, got {args.layers}")
        config["num_hidden_layers"] = args.layers
    t0 = time.monotonic()
    if args.format == "gguf":
        if args.devices is not None or args.unique_layers is not None:
            raise TpiError("--format gguf writes one file of the whole model (no --devices / --unique-layers); "
                           "shard it with `tpi shard`, or use --format safetensors-folder --devices N")
        files = write_synthetic_gguf(config, args.out, args.dtype, args.seed, force=args.force)
        n_params = param_count(config)
        nbytes = sum(f.stat().st_size for f in files)
        print(f"wrote {files[0]}: {n_params / 1e6:.1f}M params, {nbytes / 2**30:.2f} GiB {args.dtype} "
              f"({8 * nbytes / n_params:.2f} bits per weight), {time.monotonic() - t0:.1f} s")
        return 0
    if args.dtype not in FLOAT_DTYPES and args.devices is None:
        raise TpiError(f"--dtype {args.dtype}: an HF safetensors folder holds f32/f16/bf16 only; use --format gguf, "
                       "or --devices N for shard folders holding the quantized slices")
    if args.unique_layers is not None and args.devices is None:
        raise TpiError("--unique-layers needs --devices (it writes per-device shard folders)")
    if args.devices is not None:
        L = config["num_hidden_layers"]
        k = L if args.unique_layers is None else args.unique_layers
        dirs = write_unique_shards(config, args.out, args.devices, k, dtype=args.dtype, seed=args.seed,
                                   ratios=parse_ratios(args.ratios, args.devices), force=args.force,
                                   quiet=args.quiet)
        print(f"wrote {len(dirs)} shard folders to {args.out} in {time.monotonic() - t0:.1f} s"
              + (f"; note: {NOTE.format(k=k, l=L)}" if k < L else ""))
        return 0
    out = write_checkpoint(config, args.out, dtype=args.dtype, seed=args.seed, force=args.force,
                           max_shard_bytes=args.max_shard_bytes, num_shards=args.shards,
                           progress=False if args.quiet else None)
    n_params = param_count(config)
    weight_bytes = n_params * DTYPES[args.dtype].itemsize
    files = len(list(out.glob("*.safetensors")))
    print(f"wrote {out}: {n_params / 1e6:.1f}M params, {weight_bytes / 2**30:.2f} GiB {args.dtype} "
          f"in {files} file(s), {time.monotonic() - t0:.1f} s")
    return 0
