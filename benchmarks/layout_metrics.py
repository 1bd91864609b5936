"""Layout metrics of a tpicore tree: sizes, import cycles, call fan-out of one generation, results-line sites,
duplicate pairs. Measures a tree as it is (before / after a restructure) with identical definitions.

    .venv/bin/python benchmarks/layout_metrics.py --repo /work/before --json benchmarks/layout_before.json
    .venv/bin/python benchmarks/layout_metrics.py --repo . --skip-trace     # static parts only (seconds)

Standalone: stdlib only; it never imports the measured tree (the trace runs it in child processes with
PYTHONPATH=<repo>, so that tree's own code and CLI are used). Definitions:

  a. sizes      every *.py below tpicore/ and emulator/, grouped by package (a subpackage counts with all its
                files; "tpicore (top level)" = files directly in tpicore/). Lines = physical lines.
                Class size = end_lineno - lineno + 1 (decorators excluded). Thresholds: modules > 600 lines,
                classes > 250 lines.
  b. imports    module-level imports = import statements not inside any def/lambda (imports in class bodies
                and in top-level if/try count; `if TYPE_CHECKING:` blocks are left out: they never run).
                An edge goes to the named module; `from pkg import name` goes to pkg.name when that is a
                module of the tree, else to pkg. No implicit edges to parent packages. Cycles = strongly
                connected components of size > 1 (Tarjan). Function-level imports = import statements
                inside a def body (any depth) whose target is a tpicore.* / emulator.* module.
  c. trace      `python -m tpicore generate --model M --devices 4 --window 2 --max-new-tokens 1 --prompt hello`
                on the tree's own `tiny` synth checkpoint, under a sys.setprofile/threading.setprofile tracer
                (sitecustomize.py). A "call" = every profile 'call' event of a Python frame (this includes
                module bodies run at import, and generator resumptions) whose code file is under
                <repo>/tpicore. Cross-file = the caller frame's file is also under <repo>/tpicore and is a
                different file. Processes: the master (the CLI process) and its forked workers (per-pid
                files; fork children reset their counts via os.register_at_fork, and os._exit / SIGTERM are
                hooked so that workers that leave with os._exit still write). Run twice, each with a fresh
                shard cache dir: "cold" shards the checkpoint first (first use), "warm" reuses the
                cache; the headline numbers are warm. With 1 new token, "until the first token" = whole run.
  d. results    heuristic: a dict literal (or dict(...) call) in emulator/ with a string key "ttft_s" or
                "token_latency_s" is a site that builds (part of) a per-run results JSONL record; "full"
                sites also have the key "experiment" (the complete line). Writes: calls of append_jsonl(...)
                and .write(json.dumps(...)) in emulator/. All listed file:line for a human check.
  e. duplicates `duplicates --repo <repo>` (default threshold); its first line counts the pairs.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

PACKAGES = ("tpicore", "emulator")
BIG_MODULE, BIG_CLASS = 600, 250


def py_files(repo: str) -> list[str]:
    """Relative paths of every .py file under the measured packages, sorted."""
    out = []
    for pkg in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(repo, pkg)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            out += [os.path.relpath(os.path.join(root, f), repo) for f in files if f.endswith(".py")]
    return sorted(out)


def module_name(rel: str) -> str:
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def parse(repo: str, rel: str) -> tuple[str, ast.AST]:
    with open(os.path.join(repo, rel), encoding="utf-8") as f:
        text = f.read()
    return text, ast.parse(text, filename=rel)


# ---------------------------------------------------------------------------------------------------------
# a. sizes


def sizes(repo: str, files: list[str]) -> dict:
    groups: dict[str, dict] = defaultdict(lambda: {"files": 0, "lines": 0})
    modules, classes = [], []
    for rel in files:
        text, tree = parse(repo, rel)
        n = len(text.splitlines())
        parts = rel.split(os.sep)
        key = f"{parts[0]} (top level)" if len(parts) == 2 else f"{parts[0]}/{parts[1]}"
        groups[key]["files"] += 1
        groups[key]["lines"] += n
        modules.append({"module": rel, "lines": n})
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.append({"class": f"{rel}:{node.name}", "line": node.lineno,
                                "lines": node.end_lineno - node.lineno + 1})
    modules.sort(key=lambda m: -m["lines"])
    classes.sort(key=lambda c: -c["lines"])
    return {
        "packages": dict(sorted(groups.items())),
        "total": {"files": len(files), "lines": sum(m["lines"] for m in modules)},
        "largest_module": modules[0] if modules else None,
        "largest_class": classes[0] if classes else None,
        f"modules_over_{BIG_MODULE}": [m for m in modules if m["lines"] > BIG_MODULE],
        f"classes_over_{BIG_CLASS}": [c for c in classes if c["lines"] > BIG_CLASS],
    }


# ---------------------------------------------------------------------------------------------------------
# b. imports


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(import node, inside a def?) for every import statement, TYPE_CHECKING blocks left out."""
    def visit(node, in_def):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.orelse:
                    yield from visit_one(c, in_def)
                continue
            yield from visit_one(child, in_def)

    def visit_one(child, in_def):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_def
        else:
            yield from visit(child, in_def or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, False)


def _targets(node, mod: str, is_pkg: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in known else pkg for a in node.names]
    out = []
    for name in names:
        # `import a.b.c` names a.b.c; keep the longest prefix that is a module of the tree
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts:
            out.append(".".join(parts))
    return list(dict.fromkeys(out))


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def imports(repo: str, files: list[str]) -> dict:
    known = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in known}
    func_level = []
    for rel in files:
        mod = module_name(rel)
        _, tree = parse(repo, rel)
        for node, in_def in _imports(tree):
            targets = [t for t in _targets(node, mod, rel.endswith("__init__.py"), known) if t != mod]
            if not targets:
                continue
            if in_def:
                func_level.append({"at": f"{rel}:{node.lineno}", "imports": targets})
            else:
                graph[mod].update(targets)
    cycles = [c for c in _sccs(graph) if len(c) > 1]
    return {"module_edges": sum(len(v) for v in graph.values()), "cycles": cycles, "cycle_count": len(cycles),
            "function_level_imports": len(func_level), "function_level_import_sites": func_level}


# ---------------------------------------------------------------------------------------------------------
# c. trace


SITECUSTOMIZE = r'''
# Installed by benchmarks/layout_metrics.py: counts calls into <root>/tpicore when TPI_TRACE_OUT is set.
import os
if os.environ.get("TPI_TRACE_OUT"):
    import atexit, json, signal, sys, threading
    _root = os.path.realpath(os.environ["TPI_TRACE_ROOT"]) + os.sep
    _out = os.environ["TPI_TRACE_OUT"]
    _real_exit = os._exit
    _paths = {}
    _st = {}

    def _reset():
        _st.update(pid=os.getpid(), ppid=os.getppid(), calls={}, cross={}, written=False,
                   forked=_st.get("pid") is not None and _st.get("pid") != os.getpid())

    def _ours(fn):
        p = _paths.get(fn)
        if p is None:
            r = os.path.realpath(fn) if fn and not fn.startswith("<") else ""
            rel = os.path.relpath(r, _root[:-1]) if r.startswith(_root) else ""
            p = _paths[fn] = rel if rel.startswith("tpicore" + os.sep) else ""  # not .venv/ inside the repo
        return p

    def _prof(frame, event, arg):
        if event != "call":
            return
        f = _ours(frame.f_code.co_filename)
        if not f:
            return
        code = frame.f_code
        kind = "module" if code.co_name == "<module>" else "gen" if code.co_flags & 0x2A0 else "func"
        calls = _st["calls"]
        k = (f, kind)
        calls[k] = calls.get(k, 0) + 1
        b = frame.f_back
        g = (_ours(b.f_code.co_filename) or "<outside>") if b is not None else "<outside>"
        if g != f:
            cross = _st["cross"]
            k = (g, f, kind)
            cross[k] = cross.get(k, 0) + 1

    def _write():
        if _st.get("written") or _st.get("pid") != os.getpid():
            return
        _st["written"] = True
        sys.setprofile(None)
        mods = sorted({_ours(getattr(m, "__file__", None) or "") for m in list(sys.modules.values())} - {""})
        rec = {"pid": _st["pid"], "ppid": _st["ppid"], "forked": _st["forked"], "argv": sys.argv,
               "calls": [[f, k, n] for (f, k), n in sorted(_st["calls"].items())],
               "cross": [[g, f, k, n] for (g, f, k), n in sorted(_st["cross"].items())],
               "loaded": mods}
        with open(os.path.join(_out, "trace-%d.json" % _st["pid"]), "w") as fh:
            json.dump(rec, fh)

    def _exit(code=0):
        try:
            _write()
        finally:
            _real_exit(code)

    def _term(signum, frame):
        _write()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _child():
        _reset()
        atexit.register(_write)

    _reset()
    atexit.register(_write)
    os._exit = _exit
    os.register_at_fork(after_in_child=_child)
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _term)
    except ValueError:
        pass
    sys.setprofile(_prof)
    threading.setprofile(_prof)
'''


def _cli_help(repo: str, env: dict, sub: str) -> str:
    p = subprocess.run([sys.executable, "-m", "tpicore", sub, "--help"], env=env, capture_output=True, text=True,
                       cwd=repo, timeout=120, check=False)
    return p.stdout + p.stderr


def _summarize(recs: list[dict], master_pid: int, files: list[str]) -> dict:
    def top(f: str) -> bool:  # directly in tpicore/, not in a subpackage
        return f.count(os.sep) == 1

    def agg(rs):
        entered, entered_func, calls = set(), set(), 0
        cross = cross_nogen = outside = 0
        for r in rs:
            for f, kind, n in r["calls"]:
                entered.add(f)
                calls += n
                if kind != "module":
                    entered_func.add(f)
            for g, f, kind, n in r["cross"]:
                if g == "<outside>":
                    outside += n
                else:
                    cross += n
                    cross_nogen += n if kind != "gen" else 0
        loaded = set().union(*(set(r["loaded"]) for r in rs)) if rs else set()
        return {"files_entered": len(entered), "files_entered_top_level": len([f for f in entered if top(f)]),
                "files_entered_by_a_function": len(entered_func), "files_loaded": len(loaded), "calls": calls,
                "cross_file_calls": cross, "cross_file_calls_without_generator_resumes": cross_nogen,
                "calls_from_outside_tpicore": outside, "files": sorted(entered),
                "files_loaded_not_entered_by_a_function": sorted(loaded - entered_func)}

    master = [r for r in recs if r["pid"] == master_pid]
    ours = [f for f in files if f.startswith("tpicore" + os.sep)]
    return {"processes": len(recs), "tpicore_py_files": len(ours), "tpicore_top_level_py_files": len([f for f in ours if top(f)]),
            "master": agg(master), "all_processes": agg(recs),
            "per_process": [{"pid": r["pid"], "forked": r["forked"],
                             "cross_file_calls": sum(x[3] for x in r["cross"] if x[0] != "<outside>")} for r in recs]}


def trace(repo: str, files: list[str], workdir: str) -> dict:
    env = dict(os.environ)
    for v in ("TPI_TRACE_OUT", "PYTHONSTARTUP"):
        env.pop(v, None)
    tracer = os.path.join(workdir, "tracer")
    os.makedirs(tracer)
    with open(os.path.join(tracer, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    env["PYTHONPATH"] = os.pathsep.join([tracer, repo])
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    which = subprocess.run([sys.executable, "-c", "import tpicore; print(tpicore.__file__)"], env=env, cwd=workdir,
                           capture_output=True, text=True, check=False).stdout.strip()
    if not os.path.realpath(which).startswith(os.path.realpath(repo) + os.sep):
        raise SystemExit(f"tpicore resolves to {which!r}, not under {repo}")

    synth_help, gen_help = _cli_help(repo, env, "synth"), _cli_help(repo, env, "generate")
    model = os.path.join(workdir, "tiny")
    if not re.search(r"\btiny\b", synth_help):
        raise SystemExit(f"`tpi synth --help` of {repo} lists no `tiny` preset:\n{synth_help}")
    synth = [sys.executable, "-m", "tpicore", "synth", "tiny"]
    synth += ["--out", model] if "--out" in synth_help else [model]
    synth += ["--quiet"] if "--quiet" in synth_help else []
    for flag in ("--model", "--devices", "--window", "--max-new-tokens", "--prompt"):
        if flag not in gen_help:
            raise SystemExit(f"`tpi generate --help` of {repo} has no {flag}:\n{gen_help}")
    subprocess.run(synth, env=env, cwd=workdir, check=True, capture_output=True, timeout=600)
    gen = [sys.executable, "-m", "tpicore", "generate", "--model", model, "--devices", "4", "--window", "2",
           "--max-new-tokens", "1", "--prompt", "hello"]

    env["TPI_CACHE_DIR"] = os.path.join(workdir, "cache")
    env["TPI_TRACE_ROOT"] = repo
    out = {"command": " ".join(["python"] + gen[1:]), "synth_command": " ".join(["python"] + synth[1:])}
    for run in ("cold", "warm"):
        tdir = os.path.join(workdir, f"trace-{run}")
        os.makedirs(tdir)
        env["TPI_TRACE_OUT"] = tdir
        t0 = time.perf_counter()
        p = subprocess.Popen(gen, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"{out['command']} failed ({p.returncode}):\n{stderr[-3000:]}")
        time.sleep(0.5)  # let any straggling child finish its file
        recs = []
        for name in sorted(os.listdir(tdir)):
            with open(os.path.join(tdir, name)) as f:
                recs.append(json.load(f))
        out[run] = _summarize(recs, p.pid, files)
        out[run]["wall_s"] = round(time.perf_counter() - t0, 2)
        out[run]["output"] = stdout.strip()[-200:]
    return out


# ---------------------------------------------------------------------------------------------------------
# d. results-line sites


def results_sites(repo: str, files: list[str]) -> dict:
    keys = {"ttft_s", "token_latency_s"}
    builds, full, writes = [], [], []
    for rel in files:
        if not rel.startswith("emulator" + os.sep):
            continue
        _, tree = parse(repo, rel)
        for node in ast.walk(tree):
            names: set[str] = set()
            if isinstance(node, ast.Dict):
                names = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
                names = {k.arg for k in node.keywords if k.arg}
            if names & keys:
                builds.append(f"{rel}:{node.lineno}")
                if "experiment" in names:
                    full.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                dumps = name == "write" and node.args and "json.dumps" in ast.unparse(node.args[0])
                if name == "append_jsonl" or dumps:
                    writes.append(f"{rel}:{node.lineno}")
    return {"record_build_sites": len(builds), "record_build_site_list": sorted(builds),
            "full_record_sites": len(full), "full_record_site_list": sorted(full),
            "jsonl_write_sites": len(writes), "jsonl_write_site_list": sorted(writes)}


# ---------------------------------------------------------------------------------------------------------
# e. duplicates


def duplicates(repo: str) -> dict:
    exe = shutil.which("duplicates")
    if not exe:
        return {"error": "duplicates not on PATH"}
    p = subprocess.run([exe, "--repo", repo, "--seconds", "120"], capture_output=True, text=True, timeout=300, check=False)
    lines = p.stdout.strip().splitlines()
    first = lines[0] if lines else ""
    m = re.match(r"\s*(\d+)\s+pair", first)
    return {"first_line": first, "pairs": int(m.group(1)) if m else (0 if first.startswith("no duplicates") else None),
            "incomplete": [ln for ln in lines if ln.startswith("incomplete:")]}


# ---------------------------------------------------------------------------------------------------------


def report(r: dict) -> None:
    a = r["sizes"]
    print(f"== layout metrics: {r['repo']}  ({r.get('git', '')})")
    print(f"\na. sizes: {a['total']['files']} files, {a['total']['lines']} lines")
    for k, v in a["packages"].items():
        print(f"   {k:<28} {v['files']:>3} files {v['lines']:>6} lines")
    lm, lc = a["largest_module"], a["largest_class"]
    print(f"   largest module: {lm['module']} ({lm['lines']} lines)")
    print(f"   largest class:  {lc['class']} ({lc['lines']} lines)")
    mo, co = a[f"modules_over_{BIG_MODULE}"], a[f"classes_over_{BIG_CLASS}"]
    print(f"   modules > {BIG_MODULE} lines ({len(mo)}): " + ", ".join(f"{m['module']} {m['lines']}" for m in mo))
    print(f"   classes > {BIG_CLASS} lines ({len(co)}): " + ", ".join(f"{c['class']} {c['lines']}" for c in co))
    b = r["imports"]
    print(f"\nb. imports: {b['module_edges']} module-level edges, {b['cycle_count']} cycle(s) (SCC > 1)")
    for c in b["cycles"]:
        print("   cycle: " + " <-> ".join(c))
    print(f"   function-level imports of tpicore/emulator modules: {b['function_level_imports']}")
    for s in b["function_level_import_sites"]:
        print(f"     {s['at']}: {', '.join(s['imports'])}")
    c = r.get("trace")
    if c:
        print(f"\nc. trace: {c['command']}")
        for run in ("warm", "cold"):
            t = c[run]
            print(f"   [{run}] {t['processes']} processes, {t['wall_s']} s; tpicore has {t['tpicore_py_files']} .py files,"
                  f" {t['tpicore_top_level_py_files']} of them directly in tpicore/")
            for who in ("master", "all_processes"):
                m = t[who]
                print(f"     {who:<13} files entered {m['files_entered']} ({m['files_entered_top_level']} top-level;"
                      f" {m['files_entered_by_a_function']} by a function; {m['files_loaded']} loaded),"
                      f" cross-file calls {m['cross_file_calls']} ({m['cross_file_calls_without_generator_resumes']}"
                      f" without generator resumes), entries from outside tpicore {m['calls_from_outside_tpicore']},"
                      f" all calls {m['calls']}")
        print("   master (warm) files loaded but no function entered: "
              + ", ".join(c["warm"]["master"]["files_loaded_not_entered_by_a_function"]))
    elif r.get("trace_error"):
        print(f"\nc. trace failed: {r['trace_error']}")
    d = r["results"]
    print(f"\nd. results-line sites in emulator/: {d['record_build_sites']} dict(s) with ttft_s/token_latency_s keys"
          f" ({d['full_record_sites']} full records with 'experiment'); {d['jsonl_write_sites']} JSONL write site(s)")
    print("   build: " + ", ".join(d["record_build_site_list"]))
    print("   full:  " + ", ".join(d["full_record_site_list"]))
    print("   write: " + ", ".join(d["jsonl_write_site_list"]))
    e = r["duplicates"]
    print(f"\ne. duplicates: {e.get('first_line') or e.get('error')}" + (f"  {e['incomplete']}" if e.get("incomplete") else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repo", required=True, help="tree to measure (has tpicore/ and emulator/)")
    ap.add_argument("--json", help="write the full result here")
    ap.add_argument("--skip-trace", action="store_true", help="leave out c. (the only part that runs the tree)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (model, shards, per-pid traces)")
    a = ap.parse_args(argv)
    repo = os.path.realpath(a.repo)
    files = py_files(repo)
    git = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                         check=False).stdout
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True, text=True,
                         check=False).stdout
    r = {"repo": repo, "git": git.strip()[:80] + (" +uncommitted changes" if dirty.strip() else ""),
         "sizes": sizes(repo, files), "imports": imports(repo, files)}
    if not a.skip_trace:
        workdir = tempfile.mkdtemp(prefix="tpi-layout-")
        try:
            r["trace"] = trace(repo, files, workdir)
        except (SystemExit, subprocess.SubprocessError, OSError) as e:
            r["trace_error"] = str(e)[-2000:]
        finally:
            if a.keep:
                print(f"# kept {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    r["results"] = results_sites(repo, files)
    r["duplicates"] = duplicates(repo)
    report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
    return 1 if r.get("trace_error") else 0


if __name__ == "__main__":
    sys.exit(main())
