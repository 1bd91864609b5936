"""`tpi worker`: run one worker device that joins a master over TCP. Argparse and printing only."""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from tpicore.cli import checks
from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.endpoint import is_loopback
from tpicore.comm.lobby import LOBBY_WORLD
from tpicore.dist.tensor_parallel import read_secret, run_worker
from tpicore.errors import TpiError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=None, help="this device's rank (1..N-1); with --spare, an id "
                                                          "unique among the spares (default: random)")
    p.add_argument("--master", required=True, metavar="HOST:PORT", help="where the master listens")
    p.add_argument("--shards", help="this device's shard folder (rank-R from `tpi shard`)")
    p.add_argument("--model", help="this host's own copy of the model (checkpoint folder or GGUF): after a lost "
                                   "device, this worker shards its new slice from it instead of receiving it")
    p.add_argument("--spare", action="store_true",
                   help="stand by in the master's lobby and take a lost device's place (no --shards needed)")
    p.add_argument("--secret-file", help="shared secret (the same file as the master's)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    if args.spare:
        checks.exclusive("--spare", True, "--shards", args.shards is not None)
        rank = args.rank if args.rank is not None else 1 + secrets.randbelow(LOBBY_WORLD - 1)
        checks.integer("--rank", rank, 1, LOBBY_WORLD - 1)
    else:
        if args.rank is None or args.shards is None:
            raise TpiError("--rank and --shards are required (or --spare)")
        rank = args.rank
        checks.integer("--rank", rank, 1)
    checks.number("--timeout-s", args.timeout_s, lo=0, lo_open=True)
    checks.integer("--threads", args.threads, 1)
    checks.host_port("--master", args.master)
    shard_dir = None
    if args.shards is not None:
        checks.folder("--shards", args.shards)
        shard_dir = args.shards
        if os.path.isdir(os.path.join(shard_dir, f"rank-{rank}")):
            shard_dir = os.path.join(shard_dir, f"rank-{rank}")
    if args.model is not None and not os.path.exists(args.model):
        raise TpiError(f"--model: {args.model} not found")
    host = args.master.rpartition(":")[0]
    secret = read_secret(args.secret_file)
    if not is_loopback(host) and secret is None:
        raise TpiError("--secret-file is required to join a master on another host")
    report = run_worker(rank, args.master, shard_dir, secret, args.timeout_s, args.threads, model=args.model,
                        spare=args.spare)
    if report is None:
        print(f"spare {rank}: the master ended the session without needing this device", file=sys.stderr)
    else:
        print(f"rank {report.rank}: done, peak RSS {report.peak_rss_bytes / 2**20:.1f} MiB", file=sys.stderr)
    return 0
