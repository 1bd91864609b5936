"""The device processes of one run: start them behind gates, watch them, reap them.

    start()      the network (make_network: user-space shaper or kernel namespaces), the master's listener
                 on it, a fresh secret;
                 fork d0..dN-1 in rank order (emulator/run/device.py); each waits at its gate until its
                 limits are in place: a MemoryWatchdog per pid (always: RSS and its peak, VmHWM), and
                 under options.cgroup_root also a DeviceCgroup per device (the kernel's cap on what the
                 device is charged) with the page cache of its own shard files dropped first, so its
                 reads are charged to it; then every gate opens
    events()     the master's JSON lines from the events pipe (never pickled data); the one meaning it
                 reads in them: where a run is (start, token), to strike the run config's faults there
    strike       a fault (issue 15): crash = SIGKILL, hang = SIGSTOP (SIGCONT after duration_s if given),
                 link_down = the device's links down for duration_s (its LinkDown hook reads the shared
                 time); then one byte on the master's ack pipe (it waits for it before its next step)
    failed()     a device died, ran out of memory, or the pipe closed (a device struck by a fault is
                 expected to go: only the master's error ends the run then)
    check_caps() one watchdog sample of every device now (before a run is recorded as complete)
    oom_stops()  who was stopped for memory, and by what (watchdog, watchdog (peak), cgroup);
                 crashed(): who exited with an error
    cleanup()    whatever happened (done, Ctrl-C, SIGTERM, OOM, crash): kill and reap every device, stop
                 the watchdogs, remove the cgroups and the link schedule, drop the logs unless kept

Layer: run. Must not build results lines or know what the events mean beyond a run's progress
(emulator/run/launcher.py does).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import multiprocess as mp

from emulator.config.run_config import Fault, RunConfig
from emulator.host.cgroup import CGROUP, DeviceCgroup, cgroup_version, evict_page_cache
from emulator.host.limits import MemoryWatchdog
from emulator.net.network import Network, make_network
from emulator.run.baselines import DeviceSetup
from emulator.run.device import device_main
from tpicore.errors import TpiError

POLL_S = 0.1  # how often the supervisor looks at its devices while waiting for events


class Supervisor:
    """N device processes, their memory caps (`caps`: device name -> bytes), their logs under logs_root."""

    def __init__(self, cfg: RunConfig, caps: dict[str, int], logs_root: Path, grace_s: float) -> None:
        self.cfg, self.caps, self.logs_root, self.grace_s = cfg, caps, logs_root, grace_s
        self.names = [d.name for d in cfg.topology.devices]
        self.procs: dict[int, mp.Process] = {}
        self.dogs: dict[int, MemoryWatchdog] = {}
        self.cgroups: dict[int, DeviceCgroup] = {}
        self.network: Network | None = None
        self.listener = None
        self.events_r: int | None = None
        self.log_dir: str | None = None
        self.keep_logs = False
        self._buf = b""
        self._eof = False
        self.struck: set[int] = set()  # ranks a fault was struck on (their exit is not a failure)
        self._tokens: dict[int, int] = {}  # run -> tokens the master reported so far
        self._cont: list[tuple[float, int]] = []  # (monotonic time, rank): SIGCONT a hung device then
        self._ack_w: int | None = None
        self._down = None  # shared doubles: link_down until (perf_counter), per device
        self.slices_dir: str | None = None

    def start(self, shard_dirs: list[str], prompts: list[list[int]], max_seq: int,
              model_dir: str | None = None) -> None:
        """model_dir: the model every device holds a copy of (failover: the survivors re-shard it)."""
        cfg = self.cfg
        self.network = make_network(cfg.options.shaper, cfg.topology, cfg.options.clock)
        self.listener, addr = self.network.master_listener()
        self.logs_root.mkdir(parents=True, exist_ok=True)
        self.log_dir = tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=str(self.logs_root))
        self.slices_dir = tempfile.mkdtemp(prefix=f"{cfg.name}-slices-", dir=str(self.logs_root))
        ack_r = None
        if cfg.faults:
            ack_r, self._ack_w = os.pipe()
            self._down = mp.RawArray("d", cfg.world_size)
        setup = DeviceSetup(cfg, shard_dirs, prompts, max_seq, self.network, self.listener, addr,
                            secrets.token_bytes(32), model_dir=model_dir, slices_dir=self.slices_dir,
                            faults_ack_r=ack_r, link_down_until=self._down)
        self.events_r, events_w = os.pipe()
        gates = {}
        ctx = mp.get_context("fork")
        cg_version = cgroup_version(cfg.options.cgroup_root) if cfg.options.cgroup_root else None
        try:
            for rank, dev in enumerate(cfg.topology.devices):
                gate_r, gate_w = os.pipe()
                p = ctx.Process(target=device_main, name=f"emu-{dev.name}", daemon=True,
                                args=(setup, rank, gate_r, events_w, os.path.join(self.log_dir, f"{dev.name}.log")))
                p.start()
                os.close(gate_r)
                gates[rank] = gate_w
                self.procs[rank] = p
                if cg_version is not None:  # v1: cores by affinity alone (no cpu hierarchy is given)
                    cg = DeviceCgroup(cfg.options.cgroup_root, f"tpi-{os.getpid()}-{dev.name}",
                                      mem_bytes=self.caps[dev.name],
                                      cpus=dev.cores if cfg.options.clock == "wall" and cg_version == 2 else None)
                    self.cgroups[rank] = cg
                    cg.open()
                    cg.add(p.pid)
                self.dogs[rank] = MemoryWatchdog(p.pid, self.caps[dev.name], device=dev.name).start()
            if cg_version is not None:  # each device's reads fault its own files into its own group
                evict_page_cache(shard_dirs[:len(self.procs)])
        finally:
            os.close(events_w)
            if ack_r is not None:
                os.close(ack_r)
            self.listener.close()  # the master has its own copy
        for rank, gate_w in gates.items():  # limits in place: let them go
            try:
                os.write(gate_w, b"g")
            except BrokenPipeError:
                pass
            os.close(gate_w)

    # -- watching ------------------------------------------------------------------------------------
    def events(self) -> list[dict]:
        """The master's complete event lines so far (waits up to POLL_S for the first)."""
        ready, _, _ = select.select([self.events_r], [], [], POLL_S)
        if ready:
            chunk = os.read(self.events_r, 1 << 16)
            self._eof = self._eof or not chunk
            self._buf += chunk
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            ev = json.loads(line)
            out.append(ev)
            if self.cfg.faults and ev.get("ev") in ("start", "token"):
                run = ev["run"]
                self._tokens[run] = self._tokens.get(run, -1) + 1  # start: token 0
                self._strike_due(run, self._tokens[run])
        self._resume_hung()
        return out

    # -- faults --------------------------------------------------------------------------------------
    def _strike_due(self, run: int, token: int) -> None:
        due = [f for f in self.cfg.faults if (f.run, f.at_token) == (run, token)]
        for f in due:
            self.strike(f)
        if due:  # the master waits for this before its next step
            os.write(self._ack_w, b"f")

    def strike(self, f: Fault) -> None:
        """Strike fault `f` on its device now (see the module docstring)."""
        p = self.procs[f.device]
        self.struck.add(f.device)
        if f.kind == "link_down":
            self._down[f.device] = time.perf_counter() + f.duration_s
            return
        if p.exitcode is not None:
            return
        try:
            os.kill(p.pid, signal.SIGKILL if f.kind == "crash" else signal.SIGSTOP)
        except ProcessLookupError:
            return
        if f.kind == "hang" and f.duration_s is not None:
            self._cont.append((time.monotonic() + f.duration_s, f.device))

    def _resume_hung(self) -> None:
        now = time.monotonic()
        for t, rank in [c for c in self._cont if c[0] <= now]:
            self._cont.remove((t, rank))
            try:
                os.kill(self.procs[rank].pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def failed(self) -> bool:
        return self._eof or any(d.oom for d in self.dogs.values()) \
            or any(p.exitcode not in (None, 0) for r, p in self.procs.items() if r not in self.struck)

    def check_caps(self) -> bool:
        """One watchdog sample of every live device now: its RSS, or its peak RSS (VmHWM: a spike since
        the last sample), over the cap stops it. True when any device has been stopped for memory."""
        for dog in self.dogs.values():
            dog.check()
        return any(d.oom for d in self.dogs.values())

    def oom_stops(self) -> list[dict]:
        """Devices stopped for memory: {device, rss_bytes, cap_bytes, by, charged_bytes}, one per device:
        the kernel's OOM kill in its cgroup, else the watchdog's. rss_bytes: the RSS (or VmHWM) that was
        over the cap (watchdog), or the peak RSS seen (cgroup); charged_bytes: the group's peak charge
        (memory.peak / memory.max_usage_in_bytes), None without a cgroup."""
        oom = []
        for rank, dog in self.dogs.items():
            name, cg = self.names[rank], self.cgroups.get(rank)
            charged = cg.peak_bytes() if cg is not None else None
            if cg is not None and cg.oom_kills():
                dog.check()  # its last peak
                oom.append({"device": name, "rss_bytes": dog.peak_rss_bytes, "cap_bytes": self.caps[name],
                            "by": CGROUP, "charged_bytes": charged})
            elif dog.events:
                e = dog.events[0]
                oom.append({"device": name, "rss_bytes": e.rss_bytes, "cap_bytes": e.cap_bytes, "by": e.by,
                            "charged_bytes": charged})
        return oom

    def crashed(self) -> list[tuple[str, int]]:
        """Devices that exited with an error, those a fault struck left out (they were meant to go)."""
        return [(self.names[r], p.exitcode) for r, p in self.procs.items()
                if p.exitcode not in (None, 0) and r not in self.struck]

    def first_error_line(self) -> str | None:
        for rank in sorted(self.procs):
            path = os.path.join(self.log_dir or "", f"{self.names[rank]}.log")
            try:
                for line in Path(path).read_text(errors="replace").splitlines():
                    if line.startswith("error:") or line.startswith("Traceback"):
                        return line
            except OSError:
                pass
        return None

    # -- teardown ------------------------------------------------------------------------------------
    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.exitcode is None:
                try:
                    p.kill()
                except (OSError, AttributeError):
                    pass
        for p in self.procs.values():
            p.join(5.0)

    def cleanup(self, graceful: bool) -> None:
        for rank in self.struck:  # a hung device never exits by itself
            p = self.procs[rank]
            if p.exitcode is None:
                try:
                    p.kill()
                except (OSError, AttributeError):
                    pass
        if graceful:
            deadline = time.monotonic() + self.grace_s
            for p in self.procs.values():
                p.join(max(0.0, deadline - time.monotonic()))
        self.kill_all()
        for dog in self.dogs.values():
            dog.stop()
        errors = []
        for cg in self.cgroups.values():
            try:
                cg.close()
            except TpiError as e:
                errors.append(str(e))
        if self.network is not None:
            self.network.close()
        if self.listener is not None:
            self.listener.close()
        if self.events_r is not None:
            os.close(self.events_r)
            self.events_r = None
        if self._ack_w is not None:
            os.close(self._ack_w)
            self._ack_w = None
        if self.slices_dir:
            shutil.rmtree(self.slices_dir, ignore_errors=True)
        if self.log_dir and not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if errors:
            print(f"warning: {'; '.join(errors)}", file=sys.stderr)
