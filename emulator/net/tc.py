"""Kernel shaping backend (`--shaper tc`): network namespaces, veth pairs, a bridge, tc qdiscs.

For hosts whose kernel can shape: every device gets its own network namespace with one interface,
cabled by a veth pair to a bridge in a switch namespace we also create -- a star, exactly the user-space
`star` shape:

    netns tpi<tag>-d0                  netns tpi<tag>-sw                  netns tpi<tag>-d1
    +-------------------+              +-----------------------+          +-------------------+
    | eth0 10.77.0.1/24 |== veth ======| p0 --+        +-- p1  |== veth ==| eth0 10.77.0.2/24 |
    |  egress: uplink   |              |  egress:   br0 egress:|          |  egress: uplink   |
    |  tbf rate (+netem)|              |  downlink      downlink          |  tbf rate (+netem)|
    +-------------------+              +-----------------------+          +-------------------+

The uplink d_i>switch shapes eth0's egress in the device's namespace, the downlink switch>d_i shapes
p_i's egress in the switch namespace, so incast on the master's downlink queues in the kernel. Rate
uses tbf; latency, jitter and loss need netem (netem as root qdisc, tbf beneath it).

This kernel has no sch_netem (and modules cannot be loaded): a topology with any latency, jitter or
loss is refused with a clear error pointing at the user-space shaper; rate-only topologies work.
Nothing outside the namespaces we create is touched, and `close()` (or leaving the `with`) deletes
them all -- veth pairs and the bridge go with them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

from emulator.config.topology import Link, Topology
from tpicore.errors import TpiError

SUBNET = "10.77.0."
NO_NETEM = ("tc backend: this kernel has no sch_netem (delay/jitter need it); "
            "use the user-space shaper (--shaper user)")
_counter = itertools.count()


def _check_host() -> None:
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise TpiError(f"tc backend: the '{tool}' command is missing (package iproute2); "
                           f"use the user-space shaper (--shaper user)")
    if os.geteuid() != 0:
        raise TpiError("tc backend: needs root to create network namespaces; use the user-space shaper (--shaper user)")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


class TcNetwork:
    """Namespaces + veths + bridge shaping a star topology in the kernel.

        with TcNetwork(topology) as net:
            subprocess.Popen(net.exec_prefix(1) + [python, "-m", ...])   # device 1 inside its namespace
            net.address(0)                                              # "10.77.0.1"
    """

    def __init__(self, topology: Topology, tag: str | None = None) -> None:
        if len(topology) > 253:
            raise TpiError(f"tc backend: at most 253 devices fit {SUBNET}0/24, got {len(topology)}")
        for i, d in enumerate(topology.devices):
            for j, e in enumerate(topology.devices):
                if i != j and topology.paths[(d.name, e.name)] != (f"{d.name}>switch", f"switch>{e.name}"):
                    raise TpiError(f"tc backend: only star topologies map onto one bridge; {topology.name!r} "
                                   f"routes {d.name} -> {e.name} over {list(topology.paths[(d.name, e.name)])}; "
                                   f"use the user-space shaper (--shaper user)")
        self.topology = topology
        self.tag = tag or f"{os.getpid()}x{next(_counter)}"
        self.created: list[str] = []  # namespaces, deleted in close()

    def namespace(self, rank: int) -> str:
        return f"tpi{self.tag}-d{rank}"

    @property
    def switch(self) -> str:
        return f"tpi{self.tag}-sw"

    def address(self, rank: int) -> str:
        return f"{SUBNET}{rank + 1}"

    def exec_prefix(self, rank: int) -> list[str]:
        """Prefix a command with this to run it inside device `rank`'s namespace."""
        return ["ip", "netns", "exec", self.namespace(rank)]

    # -- setup ---------------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        r = _run(["ip", *args])
        if r.returncode != 0:
            raise TpiError(f"tc backend: 'ip {' '.join(args)}' failed: {r.stderr.strip()}")

    def _add_ns(self, name: str) -> None:
        self._ip("netns", "add", name)
        self.created.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str, link: Link) -> None:
        """Root qdisc on dev's egress in namespace ns: netem for delay/jitter/loss, tbf for rate."""
        needs_netem = link.latency_ms > 0 or link.jitter_ms > 0 or link.loss > 0
        parent = ["root"]
        if needs_netem:
            cmd = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                   "delay", f"{link.latency_ms}ms"]
            if link.jitter_ms:
                cmd += [f"{link.jitter_ms}ms"]
            if link.loss:
                cmd += ["loss", f"{link.loss * 100}%"]
            r = _run(cmd)
            if r.returncode != 0:
                if "unknown" in r.stderr.lower() or "no such file" in r.stderr.lower():
                    raise TpiError(NO_NETEM)
                raise TpiError(f"tc backend: '{' '.join(cmd)}' failed: {r.stderr.strip()}")
            parent = ["parent", "1:1"]
        if link.bandwidth_mbps is not None:
            rate_bit = int(link.bandwidth_mbps * 1e6)
            # burst: at least one GSO super-packet (64 KiB), and ~4 ms of traffic (a 250 Hz tick)
            burst = max(64 * 1024, rate_bit // 8 // 250)
            cmd = ["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "tbf", "rate", f"{rate_bit}bit",
                   "burst", str(burst), "latency", "100ms"]
            r = _run(cmd)
            if r.returncode != 0:
                raise TpiError(f"tc backend: '{' '.join(cmd)}' failed: {r.stderr.strip()}")

    def open(self) -> "TcNetwork":
        _check_host()
        try:
            self._add_ns(self.switch)
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
            for rank, dev in enumerate(self.topology.devices):
                ns = self.namespace(rank)
                self._add_ns(ns)
                # created inside the switch namespace, one end moved straight into the device's:
                # no interface ever appears in the host's namespace
                self._ip("-n", self.switch, "link", "add", f"p{rank}", "type", "veth",
                         "peer", "name", "eth0", "netns", ns)
                self._ip("-n", self.switch, "link", "set", f"p{rank}", "master", "br0")
                self._ip("-n", self.switch, "link", "set", f"p{rank}", "up")
                self._ip("-n", ns, "addr", "add", f"{self.address(rank)}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._shape(ns, "eth0", self.topology.links[f"{dev.name}>switch"])
                self._shape(self.switch, f"p{rank}", self.topology.links[f"switch>{dev.name}"])
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete every namespace we created (their veths and the bridge go with them)."""
        failed = []
        for ns in reversed(self.created):
            r = _run(["ip", "netns", "del", ns])
            if r.returncode != 0:
                failed.append(f"{ns}: {r.stderr.strip()}")
        self.created = []
        if failed:
            raise TpiError(f"tc backend: could not delete namespace(s) {'; '.join(failed)}")

    def __enter__(self) -> "TcNetwork":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def tc_available() -> str | None:
    """None if the tc backend can run here, else the reason (the error it would raise)."""
    try:
        _check_host()
    except TpiError as e:
        return str(e)
    return None
