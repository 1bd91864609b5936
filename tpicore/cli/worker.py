"""`tpi worker`: run one worker device that joins a master over TCP. Argparse and printing only."""

from __future__ import annotations

import argparse
import os
import sys

from tpicore.cli import checks
from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.comm.endpoint import is_loopback
from tpicore.dist.tensor_parallel import read_secret, run_worker
from tpicore.errors import TpiError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, required=True, help="this device's rank (1..N-1)")
    p.add_argument("--master", required=True, metavar="HOST:PORT", help="where the master listens")
    p.add_argument("--shards", required=True, help="this device's shard folder (rank-R from `tpi shard`)")
    p.add_argument("--secret-file", help="shared secret (the same file as the master's)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    checks.integer("--rank", args.rank, 1)
    checks.number("--timeout-s", args.timeout_s, lo=0, lo_open=True)
    checks.integer("--threads", args.threads, 1)
    checks.host_port("--master", args.master)
    checks.folder("--shards", args.shards)
    shard_dir = args.shards
    if os.path.isdir(os.path.join(shard_dir, f"rank-{args.rank}")):
        shard_dir = os.path.join(shard_dir, f"rank-{args.rank}")
    host = args.master.rpartition(":")[0]
    secret = read_secret(args.secret_file)
    if not is_loopback(host) and secret is None:
        raise TpiError("--secret-file is required to join a master on another host")
    report = run_worker(args.rank, args.master, shard_dir, secret, args.timeout_s, args.threads)
    print(f"rank {args.rank}: done, peak RSS {report.peak_rss_bytes / 2**20:.1f} MiB", file=sys.stderr)
    return 0
