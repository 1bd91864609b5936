"""One run config, start to finish: `Run(cfg).run()` -> Outcome (its results lines and an exit code).

    python -m emulator run CFG.yaml (the supervisor process)
      | model: emulator/run/model_cache.py prepares the model and shard folders once (.cache/), in a
      |        short-lived child process
      | devices: emulator/run/supervisor.py forks d0..dN-1 behind their limits (emulator/run/device.py is
      |          what runs in each; emulator/run/baselines.py what each mode does there)
      |   <---- JSON lines on a pipe --- {"ev": "token"} progress, {"ev": "run"} one per run,
      |                                  {"ev": "error"}, {"ev": "done"}      (never pickled data)
      | one results line per "run" event (+ peak RSS read from /proc/PID/status), appended as it comes
      | finally, whatever happened: the supervisor kills and reaps every device and removes what it made
      v summary table (emulator/results/report.py)

Exit codes: 0 when every run completed or a device ran out of memory (an OOM is a result: it is
recorded and reported); 1 when a device crashed (recorded too); 2 for setup and config errors
(nothing recorded); 130 on Ctrl-C, 143 on SIGTERM (the interrupted run is not recorded).

Layer: run. Owns the run's lifecycle and its results lines; must not fork (the supervisor does) or run
model code in this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
from tqdm import tqdm

from emulator.config.run_config import ROOT, RunConfig
from emulator.host.limits import MemoryWatchdog, read_rss
from emulator.results.provenance import ProvenanceProbe, host_info
from emulator.results.record import OomStop, RunMeasurement, RunRecord, append_record
from emulator.results.report import summary
from emulator.run.baselines import resident_extra_bytes
from emulator.run.device import device_threads
from emulator.run.model_cache import model_config_json, prepare
from emulator.run.supervisor import Supervisor
from tpicore.errors import TpiError

EXIT_OK, EXIT_CRASH, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM
DEFAULT_RESULTS = ROOT / "results"
DEFAULT_CACHE = ROOT / ".cache"
SETTLE_S = 0.2  # after a failure, before reading who died: a kill's other effects (watchdog events, exit codes)


def prompt_ids(cfg: RunConfig, vocab_size: int) -> list[list[int]]:
    """One prompt per run (None entries: the text prompt, tokenized by the master). Same length = same
    prompt, so repetitions repeat the same work."""
    out = []
    for length, _rep in cfg.workload.runs:
        if cfg.workload.prompt is not None:
            out.append([])
            continue
        rng = np.random.default_rng([cfg.workload.seed, length])
        out.append([int(t) for t in rng.integers(0, vocab_size, size=length)])
    return out


class Interrupted(Exception):
    pass


def _on_signal(signum, frame) -> None:
    _hold_signals()  # first thing: a second signal arriving while this one unwinds must not interrupt it
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(f"signal {signum}")


def _hold_signals() -> None:
    """Cleanup has begun: further SIGINT/SIGTERM are ignored until it is done (run() restores the handlers),
    so a double signal (Ctrl-C then SIGTERM, or two SIGTERMs) still removes everything the run made."""
    signal.signal(signal.SIGINT, _ignore)  # a no-op handler, not SIG_IGN: a signal already pending when
    signal.signal(signal.SIGTERM, _ignore)  # the handler changes must find a Python handler to run


def _ignore(signum, frame) -> None:
    pass


class Progress:
    """Tokens done / total on stderr: a tqdm bar on a terminal, a line per run otherwise."""

    def __init__(self, total_runs: int, tokens_per_run: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total_runs, self.per_run, self.enabled, self.stream = total_runs, tokens_per_run, enabled, stream
        self.bar = tqdm(total=total_runs * tokens_per_run, unit="tok", file=stream, leave=False,
                        disable=not (enabled and stream.isatty()))
        self.done = 0
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=self.stream)

    def token(self, run: int) -> None:
        self.done += 1
        self.bar.set_description(f"run {run + 1}/{self.total_runs}", refresh=False)
        self.bar.update(1)

    def run_done(self, run: int, rec: RunRecord) -> None:
        if not self.enabled:
            return
        total = self.total_runs * self.per_run
        ttft = "-" if rec.ttft_s is None else f"{rec.ttft_s:.3f} s"
        lat = "-" if rec.token_latency_s is None else f"{rec.token_latency_s:.3f} s"
        self.say(f"run {run + 1}/{self.total_runs} done: TTFT {ttft}, token latency {lat} "
                 f"[{self.done}/{total} tokens, {time.monotonic() - self.t0:.0f} s]")

    def close(self) -> None:
        self.bar.close()


@dataclass
class Outcome:
    records: list[RunRecord] = field(default_factory=list)
    exit_code: int = EXIT_OK
    results_path: str = ""
    wall_s: float = 0.0
    summary: str = ""


class Run:
    """One run config, start to finish: `Run(cfg).run()` -> Outcome (records + exit code)."""

    def __init__(self, cfg: RunConfig, results_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, grace_s: float = 5.0, point: dict | None = None,
                 description: str = "") -> None:
        self.cfg = cfg
        self.point = dict(point or {})  # the sweep point this run belongs to (emulator/run/experiments.py)
        self.description = description  # the experiment's, recorded in config (a figure's caption)
        self.results_dir = Path(results_dir) if results_dir else DEFAULT_RESULTS
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.show = progress
        self.grace_s = grace_s
        self.caps = {d.name: cfg.options.mem_cap or d.mem_bytes for d in cfg.topology.devices}
        self.devices = Supervisor(cfg, self.caps, self.cache_dir / "logs", grace_s)
        self.records: list[RunRecord] = []

    @property
    def procs(self) -> dict:
        return self.devices.procs

    @property
    def dogs(self) -> dict[int, MemoryWatchdog]:
        return self.devices.dogs

    # -- setup ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        t0 = time.monotonic()
        model, dirs = prepare(cfg, self.cache_dir, quiet=not self.show)
        self.prepare_s = time.monotonic() - t0
        self.model_dir, self.shard_dirs = model, dirs
        self.model_config = model_config_json(model)  # a folder's config.json, or a GGUF's metadata
        max_pos = self.model_config.get("max_position_embeddings", 2048)
        self.prompts = prompt_ids(cfg, self.model_config["vocab_size"])
        self.max_seq = max((len(p) for p in self.prompts), default=0) + cfg.workload.new_tokens
        if cfg.workload.prompt is None and self.max_seq > max_pos:
            raise TpiError(f"{cfg.source}: workload: prompt of {self.max_seq - cfg.workload.new_tokens} + "
                           f"{cfg.workload.new_tokens} new tokens exceeds the model's context of {max_pos}")
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
        host = doc["host"]["cpus_usable"]
        if cfg.options.clock == "wall" and sum(doc["threads"].values()) > host:
            warnings.append(f"wall clock with {cfg.world_size} devices on {host} cores: devices wait for cores, "
                            f"so times include that wait (clock: virtual does not)")
        if cfg.options.clock == "virtual" and any(d.cores > 1 for d in cfg.topology.devices):
            warnings.append("virtual clock: a device computes on 1 thread; its cores are not modelled beyond "
                            "its speed")
        doc["warnings"] = warnings
        return doc

    # -- the loop ------------------------------------------------------------------------------------
    def _supervise(self, progress: Progress, on_record: Callable[[RunRecord], None]) -> int:
        """Read the master's events until it is done or something fails; returns the exit code."""
        cfg = self.cfg
        current, error = None, None
        while True:
            for ev in self.devices.events():
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
                    if self.devices.check_caps():  # went over its cap between two watchdog samples
                        return self._failure(ev, None, on_record)
                    rec = self._record(RunMeasurement.from_json(ev))
                    on_record(rec)
                    progress.run_done(ev["run"], rec)
                    current = None
                elif kind == "error":
                    error = ev["message"]
                elif kind == "done":
                    return EXIT_OK
            if error is not None or self.devices.failed():
                return self._failure(current, error, on_record)

    def _failure(self, current: dict | None, error: str | None, on_record: Callable[[RunRecord], None]) -> int:
        """A device died, ran out of memory, or the master gave up: stop everything, record the run."""
        time.sleep(SETTLE_S)
        self.devices.kill_all()
        oom = self.devices.oom_stops()
        crashed = self.devices.crashed()
        if oom:
            reason = "; ".join(f"{o['device']} out of memory (RSS {o['rss_bytes'] / 2**20:.1f} MiB > cap "
                               f"{o['cap_bytes'] / 2**20:.1f} MiB; stopped by the {o['by']})" for o in oom)
        else:  # a device killed by a signal is the cause; the others' errors (peer lost) are its effect
            killed = [f"{n} exited with code {c} ({signal.Signals(-c).name})" for n, c in crashed if c < 0]
            reason = "; ".join(killed + [error or ""]).strip("; ") \
                or ", ".join(f"{n} exited with code {c}" for n, c in crashed) or "the master stopped"
            detail = self.devices.first_error_line()
            if not killed and detail and detail not in reason:
                reason += f" [{detail}]"
        run = current["run"] if current else len(self.records)
        if run < len(self.cfg.workload.runs):
            length, rep = self.cfg.workload.runs[run]
            prompt_len = current["prompt_len"] if current else len(self.prompts[run])
            on_record(self._record(RunMeasurement(run, prompt_len, rep), oom=oom, error=reason))
        self.devices.keep_logs = not oom
        return EXIT_OK if oom else EXIT_CRASH

    def _record(self, measured: RunMeasurement, oom: list[dict] | None = None, error: str | None = None) -> RunRecord:
        """The results line of one run: the master's measurement, with each device's peak RSS (the
        watchdog's, the kernel's high-water mark now, or the RSS it was stopped at) and memory stops."""
        stops = [OomStop(**o) for o in oom or []]
        names = [d.name for d in self.cfg.topology.devices]
        peaks, extra = {}, {}
        for rank, name in enumerate(names):
            dog = self.dogs.get(rank)
            peak = dog.peak_rss_bytes if dog else 0
            p = self.procs.get(rank)
            sample = read_rss(p.pid) if p is not None and p.exitcode is None else None
            peaks[name] = max([peak, sample[1] if sample else 0] + [o.rss_bytes for o in stops if o.device == name])
            extra[name] = self.resident_extra[rank]
        return RunRecord.measured(experiment=self.cfg.name, point=self.point, mode=self.cfg.options.mode,
                                  config=self.config_json, measurement=measured, peak_rss_bytes=peaks,
                                  extra_bytes=extra, caps=self.caps, oom=stops, error=error,
                                  provenance=self.probe.stamp())

    # -- entry ---------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        cfg = self.cfg
        out = Outcome(results_path=str(self.results_dir / f"{cfg.name}.jsonl"))
        self.records = out.records
        t0 = time.monotonic()
        self.probe = ProvenanceProbe()  # commit, dirty flag, load at the start (each line: its own window)
        in_main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _on_signal) if in_main else None
        if in_main:  # Ctrl-C the same way: the first one stops the run, later ones are held off the cleanup
            signal.signal(signal.SIGINT, _on_signal)
        progress = Progress(len(cfg.workload.runs), cfg.workload.new_tokens, self.show)
        graceful = False

        def on_record(rec: RunRecord) -> None:
            append_record(out.results_path, rec)
            out.records.append(rec)

        try:
            self._setup()
            progress.say(f"starting {cfg.world_size} devices ({cfg.options.clock} clock)")
            progress.t0 = time.monotonic()
            self.devices.start(self.shard_dirs, self.prompts, self.max_seq, model_dir=self.model_dir)
            out.exit_code = self._supervise(progress, on_record)
            graceful = out.exit_code == EXIT_OK and not any(r.error for r in out.records)
        except (KeyboardInterrupt, Interrupted) as e:
            if in_main:
                _hold_signals()  # a second Ctrl-C or a SIGTERM (of either kind) must not cut the cleanup short
            progress.say("interrupted: stopping all devices")
            out.exit_code = EXIT_TERMINATED if isinstance(e, Interrupted) else EXIT_INTERRUPTED
        finally:
            if in_main:
                _hold_signals()
            progress.close()
            try:
                self.devices.cleanup(graceful)
            finally:
                if in_main:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    signal.signal(signal.SIGTERM, old_term)
        out.wall_s = time.monotonic() - t0
        if out.records:
            out.summary = summary(out.records, out.wall_s, out.results_path)
        if self.devices.keep_logs and self.devices.log_dir:
            out.summary += f"\ndevice logs: {self.devices.log_dir}"
        return out
