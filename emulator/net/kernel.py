"""Kernel network backend: devices in network namespaces, links shaped by the kernel's token buckets.

Owns the namespaces, veth pairs, bridges, routes and qdiscs of one emulated network, their cleanup on
every exit, and entering a device's namespace. Decides no delivery time (the link model is links.py's,
the user-space delay stage hybrid.py's) and touches nothing outside the namespaces it creates (named
`tpik-<creator pid>-<n>-...`).

Two wirings, chosen from the topology:

  star (every route is d_i>switch, switch>d_j): one bridge in a switch namespace, as a LAN would be
      netns ..-d0                         netns ..-sw                          netns ..-d1
      eth0 10.77.0.1/16 == veth ======  p0 --+ br0 +-- p1  ====== veth == eth0 10.77.0.2/16
      egress: d0>switch                 egress: switch>d0, switch>d1          egress: d1>switch
  routed (klonet, full, explicit links: any topology whose link ids name their ends, "a>b"): a namespace
      per node (device, gateway, core router), a veth pair per pair of nodes with a link, a /30 on each,
      IP forwarding in routers; each device has an identity address 10.79.x.y/32 and every node a route
      to every device along the topology's own path (refused if two paths to one device disagree).
      Directed link a>b = the egress of a's end of the a-b veth.

Rate: tbf on that egress, `rate B * WIRE_PACKET_BYTES / MSS_BYTES` (the topology's bandwidth is goodput;
the kernel counts Ethernet/IP/TCP headers) and `burst BURST_WIRE_BYTES` = 2 x 1514 = 3028 wire bytes, two
full-size segments (links.py: the same bucket as the user-space model's BURST_BYTES = 2 x 1448 goodput
bytes), queue limit LIMIT_BYTES (no drops: the user-space model has none). Offloads are left as veth
has them (TSO/GSO on: tbf cuts a GSO packet bigger than its bucket into segments itself); turning
tso/gso/gro off changed neither the rate nor the CPU the host spends per byte, within noise (measured).
Latency, jitter, loss: netem under the tbf where the kernel has sch_netem; otherwise (this kernel) they
are left to the user-space delay stage (hybrid.py) on top of the kernel's rate limiting.

The network also holds the HostTransit cell its devices' delay stages share (hybrid.py), made here,
before the devices fork.

Cleanup: close() deletes every namespace (veths, bridges, qdiscs go with them); an atexit hook and
SIGTERM/SIGHUP handlers close what this process created; open() first sweeps namespaces left by
creators that no longer run (a SIGKILL leaves them).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import threading
from typing import Callable, TypeVar

from emulator.config.topology import Link, Topology
from emulator.net.hybrid import HostTransit
from emulator.net.links import BURST_BYTES, MSS_BYTES, WIRE_PACKET_BYTES
from tpicore.errors import TpiError

PREFIX = "tpik-"
BURST_WIRE_BYTES = BURST_BYTES // MSS_BYTES * WIRE_PACKET_BYTES  # tbf's bucket: the same packets, in wire bytes
LIMIT_BYTES = 64 << 20  # tbf queue: far more than any run keeps in flight, so nothing is dropped
CLONE_NEWNET = 0x40000000
_counter = itertools.count()
T = TypeVar("T")
_open: dict[str, "KernelNetwork"] = {}  # by name prefix, in the process that created them
_installed = False
_netem: bool | None = None


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


def _must(args: list[str], stdin: str | None = None) -> None:
    r = _run(args, stdin)
    if r.returncode != 0:
        what = " ".join(args) + (f" <<< {stdin.splitlines()[0]} ..." if stdin else "")
        raise TpiError(f"kernel backend: '{what}' failed: {r.stderr.strip()}")


def unavailable() -> str | None:
    """None if the kernel backend can run here, else why not (the error open() would raise)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"kernel backend: the '{tool}' command is missing (package iproute2); use --shaper user"
    if os.geteuid() != 0:
        return "kernel backend: needs root to create network namespaces; use --shaper user"
    return None


def has_netem() -> bool:
    """Whether this kernel has sch_netem (probed once, in a scratch namespace)."""
    global _netem
    if _netem is None:
        ns = f"{PREFIX}{os.getpid()}-probe"
        _must(["ip", "netns", "add", ns])
        try:
            _must(["ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
            _netem = _run(["tc", "-n", ns, "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms"]).returncode == 0
        finally:
            _run(["ip", "netns", "del", ns])
    return _netem


def namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_leftovers() -> list[str]:
    """Delete our namespaces whose creator process is gone; returns their names."""
    gone = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        pid = ns[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _run(["ip", "netns", "del", ns])
            gone.append(ns)
    return gone


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _close_all() -> None:
    for net in list(_open.values()):
        if net.creator == os.getpid():
            net.close()


def _install_cleanup() -> None:
    """atexit + SIGTERM/SIGHUP: delete this process's namespaces, then let the signal do what it did."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            _close_all()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def set_netns(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (sockets it opens then live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TpiError(f"kernel backend: cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class KernelNetwork:
    """The namespaces of one topology (see the module docstring).

        with KernelNetwork(topology) as net:
            net.enter(rank)              # in device `rank`'s process, before it opens any socket
            net.address(0)               # where device 0 listens
    """

    def __init__(self, topology: Topology, netem: bool | None = None) -> None:
        if len(topology) > 250 * 250:
            raise TpiError(f"kernel backend: at most {250 * 250} devices, got {len(topology)}")
        self.topology = topology
        self.base = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.creator = os.getpid()
        self.star = _is_star(topology)
        self.netem = netem
        self.created: list[str] = []
        self.plan = _star_plan(topology, self.base) if self.star else _routed_plan(topology, self.base)
        self.host_transit = HostTransit()  # made before the devices fork: their delay stages share it

    # -- names and addresses ---------------------------------------------------------------------------
    def namespace(self, rank: int) -> str:
        return f"{self.base}-d{rank}"

    def address(self, rank: int) -> str:
        net = "10.77" if self.star else "10.79"
        return f"{net}.{rank // 250}.{rank % 250 + 1}"

    def exec_prefix(self, rank: int) -> list[str]:
        """Prefix a command with this to run it inside device `rank`'s namespace."""
        return ["ip", "netns", "exec", self.namespace(rank)]

    def enter(self, rank: int) -> None:
        """Move the calling thread (in a device process: the process) into device `rank`'s namespace."""
        set_netns(f"/var/run/netns/{self.namespace(rank)}")

    def call_in(self, rank: int, fn: Callable[[], T]) -> T:
        """fn() run by a helper thread inside device `rank`'s namespace (sockets it opens stay there):
        `lst = net.call_in(0, lambda: open_listener(net.address(0), 0))`."""
        out: dict = {}

        def body() -> None:
            try:
                self.enter(rank)
                out["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                out["error"] = e

        t = threading.Thread(target=body, name=f"netns-{rank}", daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    # -- lifecycle ---------------------------------------------------------------------------------------
    def open(self) -> "KernelNetwork":
        why = unavailable()
        if why:
            raise TpiError(why)
        _install_cleanup()
        sweep_leftovers()
        netem = has_netem() if self.netem is None else self.netem
        if not netem and self.netem:
            raise TpiError("kernel backend: this kernel has no sch_netem (netem=True asked for it)")
        self.netem = netem
        _open[self.base] = self
        try:
            for ns in self.plan.namespaces:
                _must(["ip", "netns", "add", ns])
                self.created.append(ns)
            for phase in _Plan.PHASES:  # every veth exists before anything configures it
                for ns, lines in self.plan.lines[phase].items():
                    _must(["ip", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n")
            for ns in self.plan.routers:
                _must(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            qdiscs: dict[str, list[str]] = {}
            for ns, dev, link in self.plan.egress:
                qdiscs.setdefault(ns, []).extend(shape_commands(dev, link, self.netem))
            for ns, lines in qdiscs.items():
                if lines:
                    _must(["tc", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete every namespace this network created (veths, bridges and qdiscs go with them)."""
        if os.getpid() != self.creator:
            return
        failed = []
        for ns in reversed(self.created):
            r = _run(["ip", "netns", "del", ns])
            if r.returncode != 0 and ns in namespaces():
                failed.append(f"{ns}: {r.stderr.strip()}")
        self.created = []
        _open.pop(self.base, None)
        if failed:
            raise TpiError(f"kernel backend: could not delete namespace(s) {'; '.join(failed)}")

    def __enter__(self) -> "KernelNetwork":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def shape_commands(dev: str, link: Link, netem: bool) -> list[str]:
    """tc batch lines for one directed link on `dev`'s egress: tbf for the rate (+ netem for delay)."""
    lines = []
    parent = "root handle 1:"
    if netem and (link.latency_ms or link.jitter_ms or link.loss):
        spec = f"delay {link.latency_ms}ms" + (f" {link.jitter_ms}ms" if link.jitter_ms else "")
        spec += f" loss {link.loss * 100}%" if link.loss else ""
        lines.append(f"qdisc add dev {dev} root handle 1: netem {spec} limit 100000")
        parent = "parent 1:1 handle 2:"
    if link.bandwidth_mbps is not None:
        rate_bit = round(link.bandwidth_mbps * 1e6 * WIRE_PACKET_BYTES / MSS_BYTES)
        lines.append(f"qdisc add dev {dev} {parent} tbf rate {rate_bit}bit burst {BURST_WIRE_BYTES} limit {LIMIT_BYTES}")
    return lines


class _Plan:
    """What to create: namespaces; `ip -batch` lines per namespace in PHASES order (create the links,
    configure them, route); namespaces that forward; (namespace, device, link) for every shaped egress."""

    PHASES = ("create", "config", "routes")

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.lines: dict[str, dict[str, list[str]]] = {phase: {} for phase in self.PHASES}
        self.routers: list[str] = []
        self.egress: list[tuple[str, str, Link]] = []

    def add(self, ns: str, line: str, phase: str = "config") -> None:
        self.lines[phase].setdefault(ns, []).append(line)


def _is_star(topo: Topology) -> bool:
    names = [d.name for d in topo.devices]
    return all(topo.paths[a, b] == (f"{a}>switch", f"switch>{b}") for a in names for b in names if a != b)


def _star_plan(topo: Topology, base: str) -> _Plan:
    plan, sw = _Plan(), f"{base}-sw"
    plan.namespaces = [sw] + [f"{base}-d{r}" for r in range(len(topo))]
    plan.add(sw, "link add br0 type bridge", "create")
    plan.add(sw, "link set br0 up")
    for r, dev in enumerate(topo.devices):
        ns = f"{base}-d{r}"
        # made in the switch namespace, one end moved straight into the device's: nothing in the host's
        plan.add(sw, f"link add p{r} type veth peer name eth0 netns {ns}", "create")
        plan.add(sw, f"link set p{r} master br0")
        plan.add(sw, f"link set p{r} up")
        plan.add(ns, "link set lo up")
        plan.add(ns, f"addr add 10.77.{r // 250}.{r % 250 + 1}/16 dev eth0")
        plan.add(ns, "link set eth0 up")
        plan.egress.append((ns, "eth0", topo.links[f"{dev.name}>switch"]))
        plan.egress.append((sw, f"p{r}", topo.links[f"switch>{dev.name}"]))
    return plan


def _routed_plan(topo: Topology, base: str) -> _Plan:
    """Nodes from link ids "a>b"; a veth pair (and a /30) per pair of nodes; routes along topology paths."""
    devices = {d.name: r for r, d in enumerate(topo.devices)}
    nodes: set[str] = set()
    for lid in topo.links:
        a, sep, b = lid.partition(">")
        if not sep or not a or not b or ">" in b:
            raise TpiError(f"kernel backend: link id {lid!r} does not name its ends as 'a>b'; "
                           f"this topology cannot be built in namespaces (use --shaper user)")
        nodes.update((a, b))
    routers = sorted(nodes - set(devices))
    ns_of = {name: f"{base}-d{r}" for name, r in devices.items()}
    ns_of.update({name: f"{base}-n{k}" for k, name in enumerate(routers)})
    plan = _Plan()
    plan.namespaces = [ns_of[n] for n in sorted(nodes, key=lambda n: ns_of[n])]
    plan.routers = list(plan.namespaces)  # forwarding everywhere: a path may cross a device too
    for ns in plan.namespaces:
        plan.add(ns, "link set lo up")
    for name, r in devices.items():
        plan.add(ns_of[name], f"addr add 10.79.{r // 250}.{r % 250 + 1}/32 dev lo")
    ends: dict[tuple[str, str], tuple[str, str]] = {}  # (a, b) -> (a's device name, b's address on it)
    pairs = sorted({tuple(sorted(lid.split(">"))) for lid in topo.links})
    if len(pairs) > 16383:
        raise TpiError(f"kernel backend: {len(pairs)} node pairs do not fit 10.78.0.0/16")
    for k, (a, b) in enumerate(pairs):
        ip_a, ip_b = _p2p(k)
        dev_a, dev_b = f"v{k}a", f"v{k}b"
        plan.add(ns_of[a], f"link add {dev_a} type veth peer name {dev_b} netns {ns_of[b]}", "create")
        plan.add(ns_of[a], f"addr add {ip_a}/30 dev {dev_a}")
        plan.add(ns_of[a], f"link set {dev_a} up")
        plan.add(ns_of[b], f"addr add {ip_b}/30 dev {dev_b}")
        plan.add(ns_of[b], f"link set {dev_b} up")
        ends[a, b], ends[b, a] = (dev_a, ip_b), (dev_b, ip_a)
    for lid, link in topo.links.items():
        a, b = lid.split(">")
        plan.egress.append((ns_of[a], ends[a, b][0], link))
    next_hop: dict[tuple[str, str], str] = {}  # (node, destination device) -> the next node
    for (src, dst), route in sorted(topo.paths.items()):
        hops = [lid.split(">") for lid in route]
        if hops[0][0] != src or hops[-1][1] != dst or any(x[1] != y[0] for x, y in zip(hops, hops[1:])):
            raise TpiError(f"kernel backend: the path {src} -> {dst} ({list(route)}) is not a chain of links")
        for a, b in hops:
            seen = next_hop.setdefault((a, dst), b)
            if seen != b:
                raise TpiError(f"kernel backend: routes to {dst} leave {a} by {seen} and by {b}; the kernel "
                               f"routes by destination only (use --shaper user)")
    for (node, dst), nxt in sorted(next_hop.items()):
        r = devices[dst]
        dev, via = ends[node, nxt]
        src = f" src 10.79.{devices[node] // 250}.{devices[node] % 250 + 1}" if node in devices else ""
        plan.add(ns_of[node], f"route add 10.79.{r // 250}.{r % 250 + 1}/32 via {via} dev {dev}{src}", "routes")
    return plan


def _p2p(k: int) -> tuple[str, str]:
    n = 4 * k
    return f"10.78.{n // 256}.{n % 256 + 1}", f"10.78.{n // 256}.{n % 256 + 2}"
