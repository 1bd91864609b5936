"""`tpi synth`: write a synthetic checkpoint or per-device shard folders. Argparse and printing only."""

from __future__ import annotations

import argparse
import time

from tpicore.errors import TpiError
from tpicore.model.split import parse_ratios
from tpicore.tools.synth import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    PRESETS,
    GiB,
    param_count,
    parse_size_bytes,
    resolve_arch,
    write_checkpoint,
)
from tpicore.tools.unique_synth import NOTE, write_unique_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH",
                        help=f"a preset ({', '.join(PRESETS)}) or a path to a config.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--layers", type=int, metavar="N", help="override num_hidden_layers")
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32", help="weight dtype (default f32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint folder")
    parser.add_argument("--max-shard-bytes", type=parse_size_bytes, default=DEFAULT_MAX_SHARD_BYTES,
                        metavar="SIZE", help="start a new .safetensors file past this size (default 2GiB)")
    parser.add_argument("--shards", type=int, metavar="N", help="force about N weight files (for tests)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    huge = parser.add_argument_group("huge shapes on a small disk (per-device shard folders)")
    huge.add_argument("--devices", type=int, metavar="N", help="write N per-device shard folders directly")
    huge.add_argument("--unique-layers", type=int, metavar="K",
                      help="store K distinct layers and map the rest onto them (needs --devices)")
    huge.add_argument("--ratios", help="per-device share with --devices, e.g. 3,2,2,1")


def run(args: argparse.Namespace) -> int:
    config = resolve_arch(args.arch)
    if args.layers is not None:
        if args.layers < 1:
            raise TpiError(f"--layers must be at least 1, got {args.layers}")
        config["num_hidden_layers"] = args.layers
    t0 = time.monotonic()
    if args.unique_layers is not None and args.devices is None:
        raise TpiError("--unique-layers needs --devices (it writes per-device shard folders)")
    if args.devices is not None:

        L = config["num_hidden_layers"]
        k = args.unique_layers or L
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
    weight_bytes = n_params * DTYPES[args.dtype][2]
    files = len(list(out.glob("*.safetensors")))
    print(f"wrote {out}: {n_params / 1e6:.1f}M params, {weight_bytes / GiB:.2f} GiB {args.dtype} "
          f"in {files} file(s), {time.monotonic() - t0:.1f} s")
    return 0
