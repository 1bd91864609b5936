"""The device processes of one run: start them behind gates, watch them, reap them.

    start()      the network (make_network: user-space shaper or kernel namespaces), the master's listener
                 on it, a fresh secret;
                 fork d0..dN-1 in rank order (emulator/run/device.py); each waits at its gate until its
                 limits are in place: a MemoryWatchdog per pid (default), or a DeviceCgroup per device
                 under options.cgroup_root; then every gate opens
    events()     the master's JSON lines from the events pipe (never pickled data)
    failed()     a device died, ran out of memory, went over its cap between two samples, or the pipe closed
    oom_stops()  who was stopped for memory, and by what; crashed(): who exited with an error
    cleanup()    whatever happened (done, Ctrl-C, SIGTERM, OOM, crash): kill and reap every device, stop
                 the watchdogs, remove the cgroups and the link schedule, drop the logs unless kept

Layer: run. Must not build results lines or know what the events mean (emulator/run/launcher.py does).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import sys
import tempfile
import time
from pathlib import Path

import multiprocess as mp

from emulator.config.run_config import RunConfig
from emulator.host.limits import DeviceCgroup, MemoryWatchdog, read_rss
from emulator.net.network import Network, make_network
from emulator.run.baselines import DeviceSetup
from emulator.run.device import device_main
from tpicore.errors import TpiError

NO_CAP = 1 << 62  # the watchdog only measures when a cgroup enforces the cap
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
        self.over_cap: list[dict] = []  # devices whose VmHWM passed their cap unseen by the watchdog
        self._buf = b""
        self._eof = False

    def start(self, shard_dirs: list[str], prompts: list[list[int]], max_seq: int) -> None:
        cfg = self.cfg
        self.network = make_network(cfg.options.shaper, cfg.topology, cfg.options.clock)
        self.listener, addr = self.network.master_listener()
        setup = DeviceSetup(cfg, shard_dirs, prompts, max_seq, self.network, self.listener, addr,
                            secrets.token_bytes(32))
        self.logs_root.mkdir(parents=True, exist_ok=True)
        self.log_dir = tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=str(self.logs_root))
        self.events_r, events_w = os.pipe()
        gates = {}
        ctx = mp.get_context("fork")
        try:
            for rank, dev in enumerate(cfg.topology.devices):
                gate_r, gate_w = os.pipe()
                p = ctx.Process(target=device_main, name=f"emu-{dev.name}", daemon=True,
                                args=(setup, rank, gate_r, events_w, os.path.join(self.log_dir, f"{dev.name}.log")))
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
            out.append(json.loads(line))
        return out

    def failed(self) -> bool:
        return self._eof or any(d.oom for d in self.dogs.values()) \
            or any(p.exitcode not in (None, 0) for p in self.procs.values()) or self.check_caps()

    def check_caps(self) -> bool:
        """The watchdog samples; the kernel's high-water mark (VmHWM) also catches a device that went over
        its cap and back between two samples. Such a device is stopped like the watchdog would have."""
        if self.cfg.options.cgroup_root:
            return False  # the kernel enforces the cap
        for rank, p in self.procs.items():
            name = self.names[rank]
            sample = read_rss(p.pid) if p.exitcode is None else None
            if sample and sample[1] > self.caps[name] and not any(o["device"] == name for o in self.over_cap):
                p.kill()
                self.over_cap.append({"device": name, "rss_bytes": sample[1], "cap_bytes": self.caps[name],
                                      "by": "watchdog (peak)"})
        return bool(self.over_cap)

    def oom_stops(self) -> list[dict]:
        """Devices stopped for memory: {device, rss_bytes, cap_bytes, by}."""
        oom = list(self.over_cap)
        for dog in self.dogs.values():
            for e in dog.events:
                if not any(o["device"] == e.device for o in oom):
                    oom.append({"device": e.device, "rss_bytes": e.rss_bytes, "cap_bytes": e.cap_bytes,
                                "by": "watchdog"})
        for rank, cg in self.cgroups.items():
            if cg.oom_kills():
                oom.append({"device": self.names[rank], "rss_bytes": self.dogs[rank].peak_rss_bytes,
                            "cap_bytes": self.caps[self.names[rank]], "by": "cgroup"})
        return oom

    def crashed(self) -> list[tuple[str, int]]:
        return [(self.names[r], p.exitcode) for r, p in self.procs.items() if p.exitcode not in (None, 0)]

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
        if self.log_dir and not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if errors:
            print(f"warning: {'; '.join(errors)}", file=sys.stderr)
