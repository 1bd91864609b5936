"""`tpi shard`: write or verify per-device shard folders. Argparse and printing only."""

from __future__ import annotations

import argparse
import sys

from tpicore.cli import checks
from tpicore.model.split import parse_ratios
from tpicore.tools.shard import shard_checkpoint, verify_shard
from tpicore.weights.gguf import is_gguf_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint folder (config.json, *.safetensors)")
    p.add_argument("--devices", type=int, required=True, help="number of devices to split for")
    p.add_argument("--ratios", help="per-device share, e.g. 3,2,2,1 (default equal)")
    p.add_argument("--private-layers", type=int, default=0, metavar="K",
                   help="keep the first K layers whole on rank 0 (workers hold and see nothing of them)")
    p.add_argument("--out", required=True, help="output folder; gets rank-0 .. rank-(N-1)")
    p.add_argument("--force", action="store_true", help="replace an existing shard output folder")
    p.add_argument("--verify", action="store_true", help="re-read every shard and check its CRC32s after writing")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    checks.integer("--devices", args.devices, 1)
    checks.needs("--ratios", args.ratios is not None, "--devices N > 1", args.devices > 1)
    if not is_gguf_path(args.model):
        checks.folder("--model", args.model)
    ratios = parse_ratios(args.ratios, args.devices) if args.devices >= 1 else None
    folders = shard_checkpoint(args.model, args.out, args.devices, ratios, force=args.force, quiet=args.quiet,
                               private_layers=args.private_layers)
    if args.verify:
        for d in folders:
            verify_shard(d)
        if not args.quiet:
            print(f"shard: verified {len(folders)} folders", file=sys.stderr)
    for d in folders:
        print(d)
    return 0
