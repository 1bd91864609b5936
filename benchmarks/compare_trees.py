"""Run bench_decode, bench_tp_decode and bench_allreduce of two trees side by side: one table of key numbers.

    .venv/bin/python benchmarks/compare_trees.py --before /work/before --after /work/main [--reps 3] [--json OUT]
    .venv/bin/python benchmarks/compare_trees.py --before /work/before --after /work/before --quick   # smoke

Each tree runs its OWN benchmarks/<name>.py with PYTHONPATH=<tree> and cwd=<tree> (the scripts are not
modified; their stdout is parsed). For each benchmark the two trees alternate, ABBA style (rep 0: before
then after, rep 1: after then before, ...), so slow phases of this shared host hit both sides alike. Each
tree gets its own shard cache (TPI_CACHE_DIR=<cache-root>/<before|after>); the synthetic benchmark model
(/tmp/tpi-bench, benchmarks/common.py) is shared. The table gives, per metric, the median over reps of each
side, ratio = after / before (times: > 1 means after is slower) and spread = the larger side's
(max - min) / median over its reps: a ratio within the spread is noise.

Settings (default / --quick):
    bench_decode     --models small-100m --threads 1 --rounds 8 --warmup 2   / --rounds 2 --warmup 1
    bench_tp_decode  --tokens 16                                            / --tokens 4
    bench_allreduce  --worlds 2 4 --sizes 4 65536 --iters 200 --warmup 20    / --worlds 2 --sizes 4 --iters 30 --warmup 5
With --reps 3 (default) the whole comparison takes about 5 minutes on the 2-core host when it is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

BENCHES = ("bench_decode", "bench_tp_decode", "bench_allreduce")
ARGS = {
    "bench_decode": ["--models", "small-100m", "--threads", "1", "--rounds", "8", "--warmup", "2"],
    "bench_tp_decode": ["--tokens", "16"],
    "bench_allreduce": ["--worlds", "2", "4", "--sizes", "4", "65536", "--iters", "200", "--warmup", "20"],
}
QUICK = {
    "bench_decode": ["--models", "small-100m", "--threads", "1", "--rounds", "2", "--warmup", "1"],
    "bench_tp_decode": ["--tokens", "4"],
    "bench_allreduce": ["--worlds", "2", "--sizes", "4", "--iters", "30", "--warmup", "5"],
}
DECODE_KEYS = ("tpi_ms", "gemv_only_ms", "bound_ms", "hf_ms", "tpi_over_bound", "hf_over_tpi")


def cpu_pressure() -> float:
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------------
# parsers: stdout -> {metric: value}


def _num(s: str):
    try:
        return float(s)
    except ValueError:
        return None


def parse_aligned_tables(text: str) -> list[list[dict[str, str]]]:
    """Tables of benchmarks/common.print_table: a header, a row of dash groups (one per column, 2 spaces
    apart), right-justified cells that fit their column. Column spans come from the dash groups."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if i == 0 or not re.fullmatch(r"-+(  -+)*", line):
            continue
        spans = [m.span() for m in re.finditer(r"-+", line)]
        header = [lines[i - 1][a:b].strip() for a, b in spans]
        rows = []
        for row in lines[i + 1:]:
            if not row.strip():
                break
            rows.append({h: row[a:b].strip() for h, (a, b) in zip(header, spans)})
        tables.append(rows)
    return tables


def parse_decode(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("{") and '"tpi_ms"' in line:
            row = json.loads(line)
            tag = f"{row['model']} thr{row['threads']}"
            out.update({f"{tag} {k}": float(row[k]) for k in DECODE_KEYS if isinstance(row.get(k), (int, float))})
    if not out:  # fall back to the printed table
        heads = {"tpi ms": "tpi_ms", "GEMV-only ms": "gemv_only_ms", "bound ms": "bound_ms", "HF ms": "hf_ms"}
        for table in parse_aligned_tables(text):
            for row in table:
                tag = f"{row.get('model')} thr{row.get('thr')}"
                out.update({f"{tag} {k}": _num(row[h]) for h, k in heads.items() if _num(row.get(h, "")) is not None})
    return out


def parse_tp_decode(text: str) -> dict[str, float]:
    out = {}
    for table in parse_aligned_tables(text):
        for row in table:
            if "setting" not in row:
                continue
            for h, v in row.items():
                if h != "setting" and _num(v) is not None and h != "speedup":
                    out[f"{row['setting']} | {h}"] = _num(v)
                if h == "same tokens" and v != "True":
                    out[f"{row['setting']} | same tokens FALSE"] = 0.0
    return out


def parse_allreduce(text: str) -> dict[str, float]:
    out, cols = {}, None
    for line in text.splitlines():
        if "payload" in line and " med" in line:
            cols = [f"{a} {s}" for a, s in re.findall(r"(\S+) (med|p99)", line)]
            continue
        m = re.match(r"^\s*(\d+ (?:B|KiB|MiB))\s+(\d+)((?:\s+\d+(?:\.\d+)?)+)\s*$", line)
        if cols and m:
            for c, v in zip(cols, m.group(3).split()):
                out[f"{m.group(1)} N={m.group(2)} {c} us"] = float(v)
    return out


PARSERS = {"bench_decode": parse_decode, "bench_tp_decode": parse_tp_decode, "bench_allreduce": parse_allreduce}


# ---------------------------------------------------------------------------------------------------------


def run_one(tree: str, label: str, bench: str, args: list[str], cache_root: str, timeout_s: float) -> dict:
    script = os.path.join(tree, "benchmarks", f"{bench}.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TPI_TRACE_OUT")}
    env.update(PYTHONPATH=tree, TPI_CACHE_DIR=os.path.join(cache_root, label), TOKENIZERS_PARALLELISM="false")
    pressure = cpu_pressure()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, script, *args], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=timeout_s, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{label}: {script} {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    metrics = PARSERS[bench](p.stdout)
    if not metrics:
        raise RuntimeError(f"{label}: nothing parsed from {script}; stdout tail:\n{p.stdout[-2000:]}")
    return {"metrics": metrics, "wall_s": wall, "cpu_pressure_before": pressure, "stdout": p.stdout}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--reps", type=int, default=3, help="runs per tree and benchmark (default 3)")
    ap.add_argument("--quick", action="store_true", help="smallest settings and 1 rep (a parsing smoke test)")
    ap.add_argument("--benches", nargs="+", default=list(BENCHES), choices=BENCHES)
    ap.add_argument("--cache-root", default="/tmp/tpi-compare-cache", help="per-tree TPI_CACHE_DIR parent")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--json", help="write every run's metrics here")
    ap.add_argument("--show-output", action="store_true", help="print each run's stdout")
    a = ap.parse_args(argv)
    trees = {"before": os.path.realpath(a.before), "after": os.path.realpath(a.after)}
    reps = 1 if a.quick else a.reps
    settings = QUICK if a.quick else ARGS

    runs: dict[str, dict[str, list[dict]]] = {b: {"before": [], "after": []} for b in a.benches}
    t_start = time.perf_counter()
    for bench in a.benches:
        for rep in range(reps):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")
            for label in order:
                r = run_one(trees[label], label, bench, settings[bench], a.cache_root, a.timeout_s)
                runs[bench][label].append(r)
                print(f"# {bench} rep {rep + 1}/{reps} {label}: {r['wall_s']:.1f} s, "
                      f"{len(r['metrics'])} metrics, CPU wait {r['cpu_pressure_before']:.0f}%", file=sys.stderr, flush=True)
                if a.show_output:
                    print(r["stdout"], file=sys.stderr)

    rows = []
    for bench in a.benches:
        keys = list(dict.fromkeys(k for label in ("before", "after") for r in runs[bench][label] for k in r["metrics"]))
        for k in keys:
            vals = {label: [r["metrics"][k] for r in runs[bench][label] if k in r["metrics"]] for label in trees}
            med = {label: statistics.median(v) if v else None for label, v in vals.items()}
            spread = max(((max(v) - min(v)) / abs(statistics.median(v)) for v in vals.values()
                          if statistics.median(v)), default=None) if all(len(v) > 1 for v in vals.values()) else None
            ratio = med["after"] / med["before"] if med["before"] and med["after"] is not None else None
            rows.append({"benchmark": bench, "metric": k, "before": med["before"], "after": med["after"],
                         "ratio": ratio, "spread": spread, "n": f"{len(vals['before'])}/{len(vals['after'])}"})

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cols = [("benchmark", "benchmark"), ("metric", "metric"), ("before", "before"), ("after", "after"),
            ("ratio", "after/before"), ("spread", "spread"), ("n", "runs b/a")]
    body = [[cell(r[k]) for k, _ in cols] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, (_, h) in enumerate(cols)]
    pressures = [r["cpu_pressure_before"] for b in runs.values() for side in b.values() for r in side]
    print(f"\nbefore = {trees['before']}\nafter  = {trees['after']}")
    print(f"{reps} rep(s) per tree and benchmark, alternated ABBA; medians over reps; times in ms/us: ratio > 1 = after "
          f"slower (hf_over_tpi: > 1 = after relatively faster). Shared 2-core host: CPU wait before runs "
          f"{min(pressures):.0f}-{max(pressures):.0f}% (/proc/pressure/cpu some avg10); treat ratios within "
          f"'spread' as noise. Total {time.perf_counter() - t_start:.0f} s.")
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, ((_, h), w) in enumerate(zip(cols, widths))))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"trees": trees, "reps": reps, "settings": settings, "rows": rows,
                       "runs": {b: {s: [{k: v for k, v in r.items() if k != "stdout"} for r in rs]
                                    for s, rs in sides.items()} for b, sides in runs.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
