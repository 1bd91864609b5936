"""Run every benchmark in turn (`make bench`), each in its own process, and print their tables.

Each script compares things side by side within its own run; this only sequences them and reports
which failed. Long: the decode and scheduler benchmarks write multi-GB synthetic models to /tmp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["bench_allreduce.py", "bench_shaper.py", "bench_tp_decode.py", "bench_clock_agreement.py",
           "bench_decode.py", "bench_load.py", "bench_scheduler.py", "bench_offload.py"]


def main() -> int:
    failed = []
    for name in SCRIPTS:
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, os.path.join(HERE, name)])
        print(f"=== {name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
