"""The supervisor of one emulation experiment: N device processes, their limits, clocks and links.

    python -m emulator run CFG.yaml (this module, the supervisor)
      | model: synthesize once into .cache/models/, shard once into .cache/shards/   (in a short-lived
      |        child process, so the supervisor -- and every device forked from it -- stays small);
      |        unique-layer models (model.unique_layers) are written as shard folders directly
      |        (.cache/models/unique-*, least recently used ones evicted to stay within a disk budget)
      | LinkSchedule (shared link reservations), a listener for the master, a fresh secret
      | fork d0..dN-1 in rank order; each waits at its gate until its limits are in place:
      |   MemoryWatchdog per pid (default), or a DeviceCgroup per device under --cgroup-root
      |                                  d0 = master: the mode's driver (emulator/baselines.py: tensor
      |                                       parallel Master, pipeline stage 0, or one device alone);
      |                                       runs the prompt set
      |   <---- JSON lines on a pipe --- {"ev": "token"} progress, {"ev": "run"} one per run,
      |                                  {"ev": "error"}, {"ev": "done"}      (never pickled data)
      |                                  d1.. = workers: tpicore.parallel.run_worker (tpi, galaxy) or
      |                                       baselines.pipeline_worker (pipeline) until "stop"
      | one results line per "run" event (+ peak RSS read from /proc/PID/status)
      | finally, whatever happened (done, Ctrl-C, SIGTERM, OOM, crash): kill and reap every device,
      |   stop the watchdogs, remove the cgroups and the link schedule
      v

Every device process: CPU limits first (wall clock: affinity to its share of the host's cores and as
many BLAS threads; virtual clock: 1 BLAS thread, since thread CPU time counts the calling thread
only), then its clock (WallClock, or VirtualClock(speed) -- with compute: free one whose CPU time
never advances), a LinkShaper on that clock as the group's link hook, its shard from the cache.
The one-device modes (standalone, offload, standalone+ms) start d0 only.

Exit codes: 0 when every run completed or a device ran out of memory (an OOM is a result: it is
recorded and reported); 1 when a device crashed (recorded too); 2 for setup and config errors
(nothing recorded); 130 on Ctrl-C, 143 on SIGTERM (the interrupted run is not recorded).
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import json
import os
import secrets
import select
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from emulator.net.clock import SPIN_S, VirtualClock, WallClock
from emulator.host.limits import DeviceCgroup, MemoryWatchdog, apply_cores, read_rss
from emulator.results.report import append_jsonl, host_info, summary, utc_now
from emulator.config.run_config import ROOT, ModelSpec, RunConfig
from emulator.net.shaper import LinkSchedule, LinkShaper
from tpicore.errors import TpiError

EXIT_OK, EXIT_CRASH, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_RESULTS = ROOT / "results"
DEFAULT_CACHE = ROOT / ".cache"
NO_CAP = 1 << 62  # the watchdog only measures when a cgroup enforces the cap
TIMER_KEYS = ("compute_s", "comm_s", "load_s", "stall_s", "loads", "loaded_bytes", "stalls")


# ---------------------------------------------------------------------------------------------------
# Model and shards (cached across experiments)


def model_cache_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    layers = f"{spec.layers}L" if spec.layers else "all"
    return cache_dir / "models" / f"{spec.synth}-{layers}-{spec.dtype}-s{spec.seed}-{key}"


def resolve_model(spec: ModelSpec, cache_dir: Path, quiet: bool = False) -> str:
    """The checkpoint folder: the given path, or the synthetic preset written once into the cache."""
    if spec.path is not None:
        if not (Path(spec.path) / "config.json").is_file():
            raise TpiError(f"model.path: {spec.path} is not a checkpoint folder (no config.json)")
        return str(Path(spec.path).resolve())
    out = model_cache_dir(spec, cache_dir)
    if (out / "config.json").is_file():  # write_checkpoint renames a complete folder into place
        return str(out)
    import fcntl

    from tpicore.tools.synth import preset_config, write_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two experiments started together synthesize once
        if not (out / "config.json").is_file():
            config = preset_config(spec.synth)
            if spec.layers:
                config["num_hidden_layers"] = spec.layers
            if not quiet:
                print(f"model: synthesizing {spec.synth} ({config['num_hidden_layers']} layers, {spec.dtype}) "
                      f"into {out}", file=sys.stderr)
            write_checkpoint(config, out, dtype=spec.dtype, seed=spec.seed, progress=False)
    return str(out)


# Unique-layer models are big even with few layers stored (a 70B-shaped one: 3.4 GB per stored layer +
# the embedding and head); the disk is shared, so folders are evicted, least recently used first, to
# keep this much free and the folders within this budget (bytes; environment variables in GB).
DISK_RESERVE = int(float(os.environ.get("TPI_EMU_DISK_RESERVE_GB", "8")) * 1e9)
UNIQUE_CACHE_BUDGET = int(float(os.environ.get("TPI_EMU_CACHE_GB", "30")) * 1e9)


def _family(spec: ModelSpec, world_size: int, ratios: list[float] | None) -> str:
    """Folders of one family hold the same tensors and differ only in the layer count (the manifest)."""
    doc = {"model": {**asdict(spec), "layers": None}, "world_size": world_size, "ratios": ratios}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def unique_cache_dir(spec: ModelSpec, world_size: int, ratios: list[float] | None, cache_dir: Path) -> Path:
    from tpicore.tools.synth import PRESETS

    layers = spec.layers or PRESETS[spec.synth]["num_hidden_layers"]
    return cache_dir / "models" / (f"unique-{spec.synth}-{spec.unique_layers}of{layers}-{spec.dtype}-s{spec.seed}"
                                   f"-n{world_size}-{_family(spec, world_size, ratios)}")


def derive_layers(src: Path, out: Path, layers: int, unique: int) -> None:
    """A unique-layer folder for another layer count from one of the same family: the stored tensors are
    the same (K layers + embedding + head), so the shard files are hard-linked and only the manifests
    (config, layer_map, fingerprint) and rank 0's config.json are rewritten. Atomic like the writer."""
    import shutil

    from tpicore.weights.manifest import MANIFEST_FILE, manifest_text
    from tpicore.tools.unique_synth import NOTE

    tmp = Path(f"{out}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rank_dir in sorted(src.glob("rank-*")):
            dst = tmp / rank_dir.name
            dst.mkdir(parents=True)
            man = json.loads((rank_dir / MANIFEST_FILE).read_text())
            for f in rank_dir.iterdir():
                if f.name not in (MANIFEST_FILE, "config.json"):
                    os.link(f, dst / f.name)
            man["config"] = dict(man["config"], num_hidden_layers=layers)
            man["layer_map"] = [layer % unique for layer in range(layers)]
            man["fingerprint"] = hashlib.sha256(f"{man['fingerprint']}:{layers}".encode()).hexdigest()
            man["synthetic"] = dict(man.get("synthetic") or {}, note=NOTE.format(k=unique, l=layers),
                                    derived_from=src.name)  # the shard file's own metadata names src's count
            (dst / MANIFEST_FILE).write_text(manifest_text(man))
            if (rank_dir / "config.json").exists():
                (dst / "config.json").write_text(json.dumps(man["config"], indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unique_config(spec: ModelSpec) -> dict:
    from tpicore.tools.synth import preset_config

    config = preset_config(spec.synth)
    if spec.layers:
        config["num_hidden_layers"] = spec.layers
    return config


def unique_bytes(spec: ModelSpec) -> int:
    """Stored bytes of a unique-layer model (every rank's folder together): K layers + embedding + head."""
    import math

    from tpicore.tools.synth import DTYPES, checkpoint_tensors

    config = dict(_unique_config(spec), num_hidden_layers=spec.unique_layers)
    return sum(math.prod(shape) for _, shape in checkpoint_tensors(config)) * DTYPES[spec.dtype][2]


def _folder_bytes(path: Path) -> int:
    """Disk bytes of a folder, hard-linked files shared among their links."""
    return sum(st.st_size // st.st_nlink for f in path.rglob("*") if f.is_file() for st in [f.stat()])


def make_room(models_root: Path, need: int, keep: Path | None = None, quiet: bool = True) -> None:
    """Delete least recently used unique-layer folders until `need` bytes fit the disk reserve and the
    cache budget; TpiError if they cannot."""
    import shutil

    models_root.mkdir(parents=True, exist_ok=True)
    folders = [p for p in models_root.glob("unique-*") if p.is_dir() and p != keep
               and ".tmp-" not in p.name and ".old-" not in p.name]
    folders.sort(key=lambda p: p.stat().st_mtime)  # least recently used first (touched on every use)
    sizes = {p: _folder_bytes(p) for p in folders}
    while folders and (shutil.disk_usage(models_root).free < need + DISK_RESERVE
                       or sum(sizes.values()) + need > UNIQUE_CACHE_BUDGET):
        victim = folders.pop(0)
        if not quiet:
            print(f"model: evicting {victim.name} ({sizes[victim] / 1e9:.1f} GB) to make room", file=sys.stderr)
        shutil.rmtree(victim, ignore_errors=True)
        sizes.pop(victim)
    free = shutil.disk_usage(models_root).free
    if free < need + DISK_RESERVE:
        raise TpiError(f"{models_root}: not enough free disk for a {need / 1e9:.1f} GB model: {free / 1e9:.1f} GB "
                       f"free, {DISK_RESERVE / 1e9:.0f} GB kept in reserve (TPI_EMU_DISK_RESERVE_GB)")


def unique_shards(spec: ModelSpec, world_size: int, ratios: list[float] | None, cache_dir: Path,
                  quiet: bool = True, write: bool = True) -> list[str]:
    """Per-device shard folders of a unique-layer model for `world_size` devices, written once."""
    import fcntl

    out = unique_cache_dir(spec, world_size, ratios, cache_dir)
    dirs = [str(out / f"rank-{r}") for r in range(world_size)]

    def complete() -> bool:
        return all(os.path.isfile(os.path.join(d, "manifest.json")) for d in dirs)

    if not complete():
        if not write:
            raise TpiError(f"{out}: unique-layer shards missing")
        from tpicore.tools.unique_synth import write_unique_shards

        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{out}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not complete():
                family = [p for p in out.parent.glob(f"unique-{spec.synth}-{spec.unique_layers}of*-*-"
                                                     f"{out.name.rsplit('-', 1)[1]}")
                          if p != out and ".tmp-" not in p.name and (p / "rank-0" / "manifest.json").is_file()
                          and all((p / f"rank-{r}" / "manifest.json").is_file() for r in range(world_size))]
                if family:  # same tensors, another layer count: link, do not write again
                    import shutil

                    shutil.rmtree(out, ignore_errors=True)
                    derive_layers(family[0], out, _unique_config(spec)["num_hidden_layers"], spec.unique_layers)
                else:
                    make_room(out.parent, unique_bytes(spec), keep=out, quiet=quiet)
                    if not quiet:
                        print(f"model: writing {spec.synth} with {spec.unique_layers} unique layers for {world_size} "
                              f"device{'s' * (world_size != 1)} into {out}", file=sys.stderr)
                    write_unique_shards(_unique_config(spec), str(out), world_size, spec.unique_layers,
                                        dtype=spec.dtype, seed=spec.seed, ratios=ratios, force=out.exists(),
                                        quiet=quiet)
    os.utime(out)  # least recently used goes first
    return dirs


def prepare(cfg: RunConfig, cache_dir: Path, quiet: bool) -> tuple[str, list[str]]:
    """The model folder (its config.json) and each rank's folder: tensor parallel ranks get their shard
    folder; pipeline stages and one-device modes read the whole model (a checkpoint folder, or the
    one-device shard folder of a unique-layer model). Synthesis and sharding run in a child process
    (the writers' buffers never enter the supervisor, whose memory every device inherits)."""
    from tpicore.tools.shard import cached_shards

    spec, n, tp = cfg.model, cfg.world_size, cfg.options.tensor_parallel
    world = n if tp else 1  # what the weights are split for
    ratios = cfg.ratios() if tp else None

    def work() -> None:
        if spec.unique:
            unique_shards(spec, world, ratios, cache_dir, quiet)
            return
        model = resolve_model(spec, cache_dir, quiet)
        if tp:
            cached_shards(model, n, ratios, cache_root=str(cache_dir / "shards"), quiet=quiet)

    try:
        _in_child(work)
    except TpiError as e:
        what = spec.synth or spec.path
        raise TpiError(f"{cfg.source}: model {what} on {n} device{'s' * (n != 1)}: {e}") from None
    if spec.unique:
        folders = unique_shards(spec, world, ratios, cache_dir, write=False)
        return folders[0], folders if tp else [folders[0]] * n
    model = resolve_model(spec, cache_dir, quiet=True)
    if tp:
        return model, cached_shards(model, n, ratios, cache_root=str(cache_dir / "shards"), quiet=True)
    return model, [model] * n


def _in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child; its TpiError comes back as ours."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            fn()
        except TpiError as e:
            os.write(w, str(e).encode())
            code = 2
        except BaseException:  # noqa: BLE001 - report anything, never unwind into the parent's code
            os.write(w, traceback.format_exc().encode())
            code = 3
        os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:
        _kill_pid(pid)
        raise
    finally:
        os.close(r)
    if status != 0:
        msg = b"".join(chunks).decode(errors="replace").strip()
        raise TpiError(msg or f"model preparation failed (wait status {status})")


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def check_window(cfg: RunConfig) -> None:
    """A window needs tpicore.scheduler; on a virtual clock (or a modelled disk) it must charge its loads
    to the device's clock, which WindowSource(clock=, disk_read_mbps=) does."""
    if cfg.options.window is None:
        return
    try:
        from tpicore.runtime.window import WindowSource
    except ImportError:
        raise TpiError(f"{cfg.source}: options.window: the sliding-window scheduler (tpicore.scheduler) is not "
                       f"in this checkout; use window: none") from None
    disk = any(d.disk_read_mbps is not None for d in cfg.topology.devices)
    if (cfg.options.clock == "virtual" or disk) and "clock" not in inspect.signature(WindowSource).parameters:
        why = "clock: virtual" if cfg.options.clock == "virtual" else "a device's disk_read_mbps"
        raise TpiError(f"{cfg.source}: options.window with {why}: tpicore.scheduler.WindowSource does not take "
                       f"clock=/disk_read_mbps= yet, so disk loads cannot be charged to the device's clock; "
                       f"use window: none, or clock: wall with disk_read_mbps: null")


def prompt_ids(cfg: RunConfig, vocab_size: int) -> list[list[int]]:
    """One prompt per run (None entries: the text prompt, tokenized by the master). Same length = same
    prompt, so repetitions repeat the same work."""
    import numpy as np

    out = []
    for length, _rep in cfg.workload.runs:
        if cfg.workload.prompt is not None:
            out.append([])
            continue
        rng = np.random.default_rng([cfg.workload.seed, length])
        out.append([int(t) for t in rng.integers(0, vocab_size, size=length)])
    return out


# ---------------------------------------------------------------------------------------------------
# Device processes


@dataclass
class Plan:
    """Everything a device process needs; inherited through fork, never pickled."""

    cfg: RunConfig
    shard_dirs: list[str]
    prompts: list[list[int]]
    max_seq: int
    schedule: LinkSchedule
    listener: Any
    addr: str
    secret: bytes


def _die_with_parent() -> None:
    """Linux: SIGKILL this process if the supervisor dies (even by SIGKILL), so devices never linger."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def device_threads(cfg: RunConfig, rank: int) -> int:
    """BLAS threads (and cores pinned, wall clock) of one device."""
    if cfg.options.clock == "virtual":
        return 1
    host = len(os.sched_getaffinity(0))
    return max(1, min(cfg.topology.devices[rank].cores, host // cfg.world_size))


def make_clock(cfg: RunConfig, rank: int):
    if cfg.options.clock == "virtual":
        speed = cfg.topology.devices[rank].speed
        return VirtualClock(speed, cpu_time=(lambda: 0.0)) if cfg.options.compute == "free" else VirtualClock(speed)
    # spinning before deadlines starves other devices when there are more devices than cores
    spin = SPIN_S if cfg.world_size <= len(os.sched_getaffinity(0)) else 0.0
    return WallClock(spin_s=spin)


def _device_main(plan: Plan, rank: int, gate_r: int, events_w: int, log_path: str) -> None:
    """Entry of device process `rank` (forked). Never returns: os._exit with 0 (done) or 2 (error)."""
    code = 2
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C and reaps us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if rank != 0:
            plan.listener.close()
            os.close(events_w)
        if os.read(gate_r, 1) != b"g":  # the supervisor gave up before our limits were in place
            os._exit(0)
        os.close(gate_r)
        cfg = plan.cfg
        threads = device_threads(cfg, rank)
        if cfg.options.clock == "wall":
            apply_cores(threads, first=rank * threads)
        else:
            from tpicore.dist.tensor_parallel import set_blas_threads

            os.environ.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
            set_blas_threads(1)
        clock = make_clock(cfg, rank)
        shaper = LinkShaper(cfg.topology, plan.schedule, rank, clock, seed=cfg.workload.seed)  # jitter/loss draws
        if rank == 0:
            _master_main(plan, clock, shaper, events_w)
        elif cfg.options.mode == "pipeline":
            from emulator.run.baselines import pipeline_worker

            pipeline_worker(plan, rank, clock, shaper)
        else:
            from tpicore.dist.tensor_parallel import run_worker

            run_worker(rank, plan.addr, plan.shard_dirs[rank], plan.secret, cfg.options.timeout_s,
                       link_hook=shaper, clock=clock, disk_read_mbps=cfg.topology.devices[rank].disk_read_mbps)
        code = 0
    except TpiError as e:
        print(f"error: {plan.cfg.topology.devices[rank].name} (rank {rank}): {e}", file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a device must never unwind into the supervisor's code
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _master_main(plan: Plan, clock, shaper: LinkShaper, events_w: int) -> None:
    import numpy as np

    from emulator.run.baselines import open_driver, open_store
    from tpicore.runtime.generate import Sampling, generate

    def emit(obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(events_w, data):]

    cfg, n = plan.cfg, plan.cfg.world_size
    try:
        store = open_store(plan.shard_dirs[0])
        store.check()
        prompts, max_seq = plan.prompts, plan.max_seq
        if cfg.workload.prompt is not None:
            from tpicore.tokenizer import Tokenizer

            ids = Tokenizer.from_dir(plan.shard_dirs[0]).encode(cfg.workload.prompt)
            prompts = [ids] * len(prompts)
            max_seq = len(ids) + cfg.workload.new_tokens
        driver = open_driver(plan, store, max_seq, clock, shaper)
        before = driver.collect()  # every rank has answered once (its first report sets up what it needs)
        emit({"ev": "ready"})
        for i, ((length, rep), prompt) in enumerate(zip(cfg.workload.runs, prompts)):
            emit({"ev": "start", "run": i, "prompt_len": len(prompt)})
            t0 = time.perf_counter()
            gen = generate(driver.step, prompt, cfg.workload.new_tokens, Sampling(), (), max_seq,
                           on_token=lambda tok, i=i: emit({"ev": "token", "run": i}), now=clock.now)
            wall_s = time.perf_counter() - t0
            after = driver.collect()
            emit({"ev": "run", "run": i, "prompt_len": len(prompt), "repetition": rep, "tokens": gen.tokens,
                  "ttft_s": gen.ttft_s, "token_latencies_s": gen.token_latencies_s,
                  "token_latency_s": float(np.mean(gen.token_latencies_s)) if gen.token_latencies_s else None,
                  "wall_s": wall_s, "links": shaper.stats(), **run_reports(before, after)})
            before = after
        driver.close()
        emit({"ev": "done"})
    except TpiError as e:
        emit({"ev": "error", "message": str(e)})
        raise


def run_reports(before: list[dict], after: list[dict]) -> dict:
    """One run's share of every rank's reports (two collect() answers): time split, the window
    scheduler's per-step statistics, trace events, page cache held."""
    split, window, trace, cache = [], [], [], []
    for b, a in zip(before, after):
        split.append({k: a["timers"][k] - b["timers"][k] for k in TIMER_KEYS if k in a["timers"]})
        w = dict(a.get("window") or {})
        if "steps" in w:
            w["steps"] = w["steps"][len((b.get("window") or {}).get("steps", [])):]
        window.append(w)
        trace.append(a.get("events", [])[len(b.get("events", [])):])
        cache.append((a.get("memory") or {}).get("page_cache_bytes"))
    return {"time_split": split, "window": window, "trace": trace, "page_cache_bytes": cache}


# ---------------------------------------------------------------------------------------------------
# The supervisor


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


EXIT_TERMINATED = 128 + signal.SIGTERM


class Progress:
    """Tokens done / total on stderr: one rewritten line on a terminal, a line per run otherwise."""

    def __init__(self, total_runs: int, tokens_per_run: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total_runs, self.per_run, self.enabled, self.stream = total_runs, tokens_per_run, enabled, stream
        self.tty = enabled and stream.isatty()
        self.done = 0
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        if self.enabled:
            self._clear()
            print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")

    def token(self, run: int) -> None:
        self.done += 1
        if self.tty:
            total = self.total_runs * self.per_run
            self.stream.write(f"\r\033[Krun {run + 1}/{self.total_runs}: {self.done}/{total} tokens "
                              f"({time.monotonic() - self.t0:.0f} s)")
            self.stream.flush()

    def run_done(self, run: int, rec: dict) -> None:
        if not self.enabled:
            return
        total = self.total_runs * self.per_run
        ttft = "-" if rec["ttft_s"] is None else f"{rec['ttft_s']:.3f} s"
        lat = "-" if rec["token_latency_s"] is None else f"{rec['token_latency_s']:.3f} s"
        self.say(f"run {run + 1}/{self.total_runs} done: TTFT {ttft}, token latency {lat} "
                 f"[{self.done}/{total} tokens, {time.monotonic() - self.t0:.0f} s]")


@dataclass
class Outcome:
    records: list[dict] = field(default_factory=list)
    exit_code: int = EXIT_OK
    results_path: str = ""
    wall_s: float = 0.0
    summary: str = ""


class Experiment:
    """One run config, start to finish: `Experiment(cfg).run()` -> Outcome (records + exit code)."""

    def __init__(self, cfg: RunConfig, results_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, grace_s: float = 5.0, point: dict | None = None,
                 description: str = "") -> None:
        self.cfg = cfg
        self.point = dict(point or {})  # the sweep point this run belongs to (emulator/experiments.py)
        self.description = description  # the experiment's, recorded in config (a figure's caption)
        self.results_dir = Path(results_dir) if results_dir else DEFAULT_RESULTS
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.show = progress
        self.grace_s = grace_s
        self.procs: dict[int, Any] = {}
        self.dogs: dict[int, MemoryWatchdog] = {}
        self.cgroups: dict[int, DeviceCgroup] = {}
        self.schedule: LinkSchedule | None = None
        self.listener = None
        self.events_r: int | None = None
        self.log_dir: str | None = None
        self.over_cap: list[dict] = []  # devices whose VmHWM passed their cap unseen by the watchdog

    # -- setup ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        check_window(cfg)
        t0 = time.monotonic()
        model, dirs = prepare(cfg, self.cache_dir, quiet=not self.show)
        self.prepare_s = time.monotonic() - t0
        self.model_dir, self.shard_dirs = model, dirs
        with open(os.path.join(model, "config.json")) as f:
            self.model_config = json.load(f)
        max_pos = self.model_config.get("max_position_embeddings", 2048)
        self.prompts = prompt_ids(cfg, self.model_config["vocab_size"])
        self.max_seq = max((len(p) for p in self.prompts), default=0) + cfg.workload.new_tokens
        if cfg.workload.prompt is None and self.max_seq > max_pos:
            raise TpiError(f"{cfg.source}: workload: prompt of {self.max_seq - cfg.workload.new_tokens} + "
                           f"{cfg.workload.new_tokens} new tokens exceeds the model's context of {max_pos}")
        self.caps = {d.name: cfg.options.mem_cap or d.mem_bytes for d in cfg.topology.devices}
        from emulator.run.baselines import resident_extra_bytes

        self.resident_extra = resident_extra_bytes(cfg, self.shard_dirs)
        self.config_json = self._resolved_config()

    def _resolved_config(self) -> dict:
        cfg = self.cfg
        c = self.model_config
        doc = cfg.to_json()
        if self.description:
            doc["description"] = self.description
        doc["model"].update(folder=self.model_dir, shards=os.path.dirname(self.shard_dirs[0]), config={
            k: c.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                  "intermediate_size", "vocab_size", "head_dim", "torch_dtype")})
        if cfg.model.path is not None:
            doc["model"]["dtype"] = c.get("torch_dtype")
        doc["clock"] = {"kind": cfg.options.clock, "compute": cfg.options.compute,
                        "speeds": {d.name: d.speed for d in cfg.topology.devices}}
        doc["threads"] = {d.name: device_threads(cfg, r) for r, d in enumerate(cfg.topology.devices)}
        doc["mem_caps_bytes"] = self.caps
        doc["memory_limit"] = "cgroup" if cfg.options.cgroup_root else "watchdog"
        doc["devices_run"] = [d.name for d in cfg.topology.devices]  # one-device modes: the first alone
        doc["host"] = host_info()
        warnings = []
        if any(self.resident_extra):
            warnings.append(f"model with {cfg.model.unique_layers} unique layers and resident weights: peak_mem_bytes "
                            f"adds the repeated layers a real model would hold to the measured RSS")
        if cfg.options.tensor_parallel and cfg.options.window and not cfg.options.drop_cache:
            from dataclasses import fields

            from tpicore.dist.tensor_parallel import RunOptions

            if "drop_cache" not in {f.name for f in fields(RunOptions)}:
                warnings.append("options.drop_cache: false is not supported by tpicore.parallel.RunOptions in this "
                                "checkout: tensor-parallel windows drop the page cache (same results, more real time)")
        host = doc["host"]["cpus_usable"]
        if cfg.options.clock == "wall" and sum(doc["threads"].values()) > host:
            warnings.append(f"wall clock with {cfg.world_size} devices on {host} cores: devices wait for cores, "
                            f"so times include that wait (clock: virtual does not)")
        if cfg.options.clock == "virtual" and any(d.cores > 1 for d in cfg.topology.devices):
            warnings.append("virtual clock: a device computes on 1 thread; its cores are not modelled beyond "
                            "its speed")
        doc["warnings"] = warnings
        return doc

    def _start_devices(self) -> None:
        import multiprocess as mp

        from tpicore.comm.transport import open_listener

        cfg = self.cfg
        self.schedule = LinkSchedule.create(len(cfg.topology.links))
        self.listener = open_listener("127.0.0.1", 0)
        addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        plan = Plan(cfg, self.shard_dirs, self.prompts, self.max_seq, self.schedule, self.listener, addr,
                    secrets.token_bytes(32))
        self.log_dir = tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=self._logs_root())
        self.events_r, events_w = os.pipe()
        gates = {}
        ctx = mp.get_context("fork")
        try:
            for rank, dev in enumerate(cfg.topology.devices):
                gate_r, gate_w = os.pipe()
                p = ctx.Process(target=_device_main, name=f"emu-{dev.name}", daemon=True,
                                args=(plan, rank, gate_r, events_w, os.path.join(self.log_dir, f"{dev.name}.log")))
                p.start()
                os.close(gate_r)
                gates[rank] = gate_w
                self.procs[rank] = p
                if cfg.options.cgroup_root:
                    cg = DeviceCgroup(cfg.options.cgroup_root, f"tpi-{os.getpid()}-{dev.name}",
                                      mem_bytes=self.caps[dev.name],
                                      cpus=dev.cores if cfg.options.clock == "wall" else None)
                    self.cgroups[rank] = cg
                    cg.open()
                    cg.add(p.pid)
                cap = NO_CAP if cfg.options.cgroup_root else self.caps[dev.name]
                self.dogs[rank] = MemoryWatchdog(p.pid, cap, device=dev.name).start()
        finally:
            os.close(events_w)
            self.listener.close()  # the master has its own copy
        for rank, gate_w in gates.items():  # limits in place: let them go
            try:
                os.write(gate_w, b"g")
            except BrokenPipeError:
                pass
            os.close(gate_w)

    def _logs_root(self) -> str:
        root = self.cache_dir / "logs"
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    # -- the loop ------------------------------------------------------------------------------------
    def _supervise(self, progress: Progress, on_record: Callable[[dict], None]) -> int:
        """Read the master's events until it is done or something fails; returns the exit code."""
        cfg = self.cfg
        buf, current, error = b"", None, None
        names = [d.name for d in cfg.topology.devices]
        while True:
            ready, _, _ = select.select([self.events_r], [], [], 0.1)
            eof = False
            if ready:
                chunk = os.read(self.events_r, 1 << 16)
                eof = not chunk
                buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                ev = json.loads(line)
                kind = ev["ev"]
                if kind == "ready":
                    runs = len(cfg.workload.runs)
                    progress.say(f"{cfg.world_size} devices ready; running {runs} run{'s' * (runs != 1)} of "
                                 f"{cfg.workload.new_tokens} tokens")
                elif kind == "start":
                    current = ev
                elif kind == "token":
                    progress.token(ev["run"])
                elif kind == "run":
                    if self._over_cap():  # went over its cap between two watchdog samples
                        return self._failure(ev, None, names, on_record)
                    rec = self._record(ev)
                    on_record(rec)
                    progress.run_done(ev["run"], rec)
                    current = None
                elif kind == "error":
                    error = ev["message"]
                elif kind == "done":
                    return EXIT_OK
            failed = eof or error is not None or any(d.oom for d in self.dogs.values()) \
                or any(p.exitcode not in (None, 0) for p in self.procs.values()) or self._over_cap()
            if failed:
                return self._failure(current, error, names, on_record)

    def _failure(self, current: dict | None, error: str | None, names: list[str],
                 on_record: Callable[[dict], None]) -> int:
        """A device died, ran out of memory, or the master gave up: stop everything, record the run."""
        time.sleep(0.2)  # let a kill's other effects (a watchdog's event, exit codes) land
        self._kill_all()
        oom = list(self.over_cap)
        for rank, dog in self.dogs.items():
            for e in dog.events:
                if not any(o["device"] == e.device for o in oom):
                    oom.append({"device": e.device, "rss_bytes": e.rss_bytes, "cap_bytes": e.cap_bytes,
                                "by": "watchdog"})
        for rank, cg in self.cgroups.items():
            if cg.oom_kills():
                oom.append({"device": names[rank], "rss_bytes": self.dogs[rank].peak_rss_bytes,
                            "cap_bytes": self.caps[names[rank]], "by": "cgroup"})
        crashed = [(names[r], p.exitcode) for r, p in self.procs.items() if p.exitcode not in (None, 0)]
        if oom:
            reason = "; ".join(f"{o['device']} out of memory (RSS {o['rss_bytes'] / 2**20:.1f} MiB > cap "
                               f"{o['cap_bytes'] / 2**20:.1f} MiB; stopped by the {o['by']})" for o in oom)
        else:  # a device killed by a signal is the cause; the others' errors (peer lost) are its effect
            killed = [f"{n} exited with code {c} ({signal.Signals(-c).name})" for n, c in crashed if c < 0]
            reason = "; ".join(killed + [error or ""]).strip("; ") \
                or ", ".join(f"{n} exited with code {c}" for n, c in crashed) or "the master stopped"
            detail = self._first_error_line()
            if not killed and detail and detail not in reason:
                reason += f" [{detail}]"
        run = current["run"] if current else len(self.records)
        if run < len(self.cfg.workload.runs):
            length, rep = self.cfg.workload.runs[run]
            on_record(self._record({"run": run, "prompt_len": current["prompt_len"] if current else
                                    len(self.prompts[run]), "repetition": rep, "tokens": [], "ttft_s": None,
                                    "token_latencies_s": [], "token_latency_s": None, "wall_s": None,
                                    "time_split": [], "links": {}}, oom=oom, error=reason))
        self.keep_logs = not oom
        return EXIT_OK if oom else EXIT_CRASH

    def _over_cap(self) -> bool:
        """The watchdog samples; the kernel's high-water mark (VmHWM) also catches a device that went over
        its cap and back between two samples. Such a device is stopped like the watchdog would have."""
        if self.cfg.options.cgroup_root:
            return False  # the kernel enforces the cap
        for rank, p in self.procs.items():
            name = self.cfg.topology.devices[rank].name
            sample = read_rss(p.pid) if p.exitcode is None else None
            if sample and sample[1] > self.caps[name] and not any(o["device"] == name for o in self.over_cap):
                p.kill()
                self.over_cap.append({"device": name, "rss_bytes": sample[1], "cap_bytes": self.caps[name],
                                      "by": "watchdog (peak)"})
        return bool(self.over_cap)

    def _first_error_line(self) -> str | None:
        for rank in sorted(self.procs):
            path = os.path.join(self.log_dir or "", f"{self.cfg.topology.devices[rank].name}.log")
            try:
                for line in Path(path).read_text(errors="replace").splitlines():
                    if line.startswith("error:") or line.startswith("Traceback"):
                        return line
            except OSError:
                pass
        return None

    def _record(self, ev: dict, oom: list | None = None, error: str | None = None) -> dict:
        names = [d.name for d in self.cfg.topology.devices]
        peaks, mem = {}, {}
        for rank, name in enumerate(names):
            dog = self.dogs.get(rank)
            peak = dog.peak_rss_bytes if dog else 0
            p = self.procs.get(rank)
            sample = read_rss(p.pid) if p is not None and p.exitcode is None else None
            peaks[name] = max([peak, sample[1] if sample else 0] + [o["rss_bytes"] for o in oom or [] if o["device"] == name])
            mem[name] = peaks[name] + self.resident_extra[rank]
        per_rank = {key: {names[r]: v for r, v in enumerate(ev.get(key) or []) if v}
                    for key in ("window", "trace", "page_cache_bytes")}
        return {
            "experiment": self.cfg.name, "point": self.point, "mode": self.cfg.options.mode, "run": ev["run"],
            "prompt_len": ev["prompt_len"], "repetition": ev["repetition"], "config": self.config_json,
            "tokens": ev["tokens"], "ttft_s": ev["ttft_s"], "token_latencies_s": ev["token_latencies_s"],
            "token_latency_s": ev["token_latency_s"], "peak_rss_bytes": peaks, "peak_mem_bytes": mem,
            "mem_over_cap": [n for n in names if mem[n] > self.caps[n]],
            "time_split": {names[r]: s for r, s in enumerate(ev["time_split"])},
            "oom": oom or [], "error": error, "wall_s": ev["wall_s"], "links": ev["links"], **per_rank,
            "time": utc_now(),
        }

    # -- teardown ------------------------------------------------------------------------------------
    def _kill_all(self) -> None:
        for p in self.procs.values():
            if p.exitcode is None:
                try:
                    p.kill()
                except (OSError, AttributeError):
                    pass
        for p in self.procs.values():
            p.join(5.0)

    def _cleanup(self, graceful: bool) -> None:
        if graceful:
            deadline = time.monotonic() + self.grace_s
            for p in self.procs.values():
                p.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()
        for dog in self.dogs.values():
            dog.stop()
        errors = []
        for cg in self.cgroups.values():
            try:
                cg.close()
            except TpiError as e:
                errors.append(str(e))
        if self.schedule is not None:
            self.schedule.close()
        if self.listener is not None:
            self.listener.close()
        if self.events_r is not None:
            os.close(self.events_r)
            self.events_r = None
        if self.log_dir and not getattr(self, "keep_logs", False):
            import shutil

            shutil.rmtree(self.log_dir, ignore_errors=True)
        if errors:
            print(f"warning: {'; '.join(errors)}", file=sys.stderr)

    # -- entry ---------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        cfg = self.cfg
        out = Outcome(results_path=str(self.results_dir / f"{cfg.name}.jsonl"))
        self.records = out.records
        t0 = time.monotonic()
        in_main = _is_main_thread()
        old_term = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
        progress = Progress(len(cfg.workload.runs), cfg.workload.new_tokens, self.show)
        graceful = False

        def on_record(rec: dict) -> None:
            append_jsonl(out.results_path, rec)
            out.records.append(rec)

        try:
            self._setup()
            progress.say(f"starting {cfg.world_size} devices ({cfg.options.clock} clock)")
            progress.t0 = time.monotonic()
            self._start_devices()
            out.exit_code = self._supervise(progress, on_record)
            graceful = out.exit_code == EXIT_OK and not any(r["error"] for r in out.records)
        except (KeyboardInterrupt, Interrupted) as e:
            if in_main:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            progress.say("interrupted: stopping all devices")
            out.exit_code = EXIT_TERMINATED if isinstance(e, Interrupted) else EXIT_INTERRUPTED
        finally:
            if in_main:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self._cleanup(graceful)
            finally:
                if in_main:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    signal.signal(signal.SIGTERM, old_term)
        out.wall_s = time.monotonic() - t0
        if out.records:
            out.summary = summary(out.records, out.wall_s, out.results_path)
        if getattr(self, "keep_logs", False) and self.log_dir:
            out.summary += f"\ndevice logs: {self.log_dir}"
        return out


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
