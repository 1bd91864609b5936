"""Emulated topology as data: devices, directed links, and the path of links between every pair.

A topology file (configs/topologies/*.yaml) lists devices and links; links come either as an explicit
list (one direct link per listed pair) or as a named `shape` that generates them:

    star     every device has one access link to a switch, modelled as two directed links so the
             master's downlink carries all N-1 incoming payloads (incast) and queues them.
                 d_i --(d_i>switch)--> switch --(switch>d_j)--> d_j            path i->j: 2 links
    klonet   the paper's testbed: device h_i behind home gateway r_i, gateways joined by core router r9.
                 d_i > gw:d_i > core > gw:d_j > d_j                            path i->j: 4 links
    full     a direct link per ordered pair.                                   path i->j: 1 link

Units are in the field names: latency_ms, jitter_ms, bandwidth_mbps (megabits/s; None = unlimited),
mem_bytes, disk_read_mbps (megabits/s too, like every *_mbps in this project; "2GB/s" is accepted and
converted). Values may be plain numbers in the field's unit or strings with units ("5ms", "1gbps",
"8GiB"). GB/MB are decimal (1e9), GiB/MiB binary (2**30).

Device order is rank order: devices[0] is the master.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tpicore.errors import TpiError

SHAPES = ("star", "klonet", "full")


# ---------------------------------------------------------------------------------------------------
# Unit parsing. Each parser takes the raw YAML value and the field name used in error messages.

_TIME_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
# megabits per second per unit; matched case-insensitively
_RATE_BITS = {"bps": 1e-6, "kbps": 1e-3, "mbps": 1.0, "gbps": 1e3,
              "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3, "kbit/s": 1e-3, "mbit/s": 1.0, "gbit/s": 1e3}
# bytes per second, matched case-sensitively (capital B = bytes) and converted to megabits per second
_RATE_BYTES = {"B/s": 8e-6, "kB/s": 8e-3, "KB/s": 8e-3, "MB/s": 8.0, "GB/s": 8e3}
_MEM_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TpiError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise TpiError(f"{name}: must be finite, got {value!r}")
    return float(value)


def _with_unit(value: Any, name: str, factor, plain: str, units: str) -> float:
    """A number in the field's own unit, or a string '<number><unit>' where factor(unit) converts the
    unit to the field's (None if unknown)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*", value)
        if m:
            f = 1.0 if m.group(2) == "" else factor(m.group(2))
            if f is not None:
                return float(m.group(1)) * f
        raise TpiError(f"{name}: cannot parse {value!r} (a number in {plain}, or with a unit: {units})")
    return _number(value, name)


def parse_ms(value: Any, name: str) -> float:
    """Time in milliseconds: 5, 5.0, '5ms', '500us', '1s'."""
    return _with_unit(value, name, lambda u: _TIME_MS.get(u.lower()), "ms", "us, ms, s")


def parse_mbps(value: Any, name: str) -> float | None:
    """Rate in megabits/s: 300, '300mbps', '1gbps', '2GB/s' (bytes). None/'unlimited' -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("unlimited", "inf", "none")):
        return None
    return _with_unit(value, name, lambda u: _RATE_BITS.get(u.lower(), _RATE_BYTES.get(u)), "Mbit/s",
                      "kbps, mbps, gbps, MB/s, GB/s, unlimited")


def parse_bytes(value: Any, name: str) -> int:
    """Memory in bytes: 8589934592, '8GiB', '512MiB', '8GB' (= 8e9)."""
    if isinstance(value, str):
        return int(_with_unit(value, name, lambda u: _MEM_BYTES.get(u.lower()), "bytes",
                              "B, KB, MB, GB, KiB, MiB, GiB"))
    v = _number(value, name)
    if v != int(v):
        raise TpiError(f"{name}: expected a whole number of bytes, got {value!r}")
    return int(v)


def parse_fraction(value: Any, name: str) -> float:
    """A probability: 0.01 or '1%'."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return _with_unit(value.strip()[:-1], name, lambda u: None, "percent", "%") / 100.0
    return _number(value, name)


# ---------------------------------------------------------------------------------------------------
# The data.


@dataclass(frozen=True)
class Device:
    """One emulated edge device. `speed` is its compute speed relative to the reference device (1.0):
    the virtual clock divides measured CPU time by it."""

    name: str
    cores: int
    mem_bytes: int
    disk_read_mbps: float | None = None  # megabits/s; None = not modelled (the host's disk speed)
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise TpiError(f"name: expected letters, digits, '_', '.', '-', got {self.name!r}")
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise TpiError(f"cores: must be an integer >= 1, got {self.cores!r}")
        if isinstance(self.mem_bytes, bool) or not isinstance(self.mem_bytes, int) or self.mem_bytes <= 0:
            raise TpiError(f"mem_bytes: must be an integer > 0, got {self.mem_bytes!r}")
        if self.disk_read_mbps is not None and not _number(self.disk_read_mbps, "disk_read_mbps") > 0:
            raise TpiError(f"disk_read_mbps: must be > 0 (or null for unmodelled), got {self.disk_read_mbps!r}")
        if not _number(self.speed, "speed") > 0:
            raise TpiError(f"speed: must be > 0, got {self.speed!r}")

    @property
    def disk_read_bytes_per_s(self) -> float | None:
        return None if self.disk_read_mbps is None else self.disk_read_mbps * 1e6 / 8


@dataclass(frozen=True)
class Link:
    """One directed link. Delay of a message of n bytes on an idle link: n*8/bandwidth + latency.

    jitter_ms: each traversal adds a uniform sample in [-jitter, +jitter] (netem's default
    distribution), never making the delay negative. loss: probability that a packet is lost on this
    link; emulated as a retransmission delay, not a drop (see shaper.py)."""

    latency_ms: float = 0.0
    bandwidth_mbps: float | None = None  # megabits/s; None = unlimited
    jitter_ms: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not _number(self.latency_ms, "latency_ms") >= 0:
            raise TpiError(f"latency_ms: must be >= 0, got {self.latency_ms!r}")
        if self.bandwidth_mbps is not None and not _number(self.bandwidth_mbps, "bandwidth_mbps") > 0:
            raise TpiError(f"bandwidth_mbps: must be > 0 (null for unlimited), got {self.bandwidth_mbps!r}")
        if not _number(self.jitter_ms, "jitter_ms") >= 0:
            raise TpiError(f"jitter_ms: must be >= 0, got {self.jitter_ms!r}")
        if not 0 <= _number(self.loss, "loss") < 1:
            raise TpiError(f"loss: must be in [0, 1), got {self.loss!r}")

    @property
    def bytes_per_s(self) -> float:
        return math.inf if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8

    @property
    def is_ideal(self) -> bool:
        """Zero latency, unlimited, no jitter or loss: the shaper can skip it entirely."""
        return self.latency_ms == 0 and self.bandwidth_mbps is None and self.jitter_ms == 0 and self.loss == 0


@dataclass(frozen=True)
class Topology:
    """Devices in rank order, directed links by id, and the route (tuple of link ids) for every ordered
    pair of distinct devices, keyed by device names."""

    devices: tuple[Device, ...]
    links: dict[str, Link]
    paths: dict[tuple[str, str], tuple[str, ...]]
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise TpiError("devices: need at least one device")
        names = [d.name for d in self.devices]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise TpiError(f"devices[{i}].name: duplicate device name {n!r}")
        for lid, link in self.links.items():
            if not isinstance(link, Link):
                raise TpiError(f"links[{lid!r}]: expected a Link, got {type(link).__name__}")
        known = set(names)
        for (src, dst), route in self.paths.items():
            for end in (src, dst):
                if end not in known:
                    raise TpiError(f"paths[{src!r}, {dst!r}]: unknown device {end!r} (devices: {', '.join(names)})")
            if not route:
                raise TpiError(f"paths[{src!r}, {dst!r}]: empty route")
            for lid in route:
                if lid not in self.links:
                    raise TpiError(f"paths[{src!r}, {dst!r}]: unknown link {lid!r}")
        for a in names:
            for b in names:
                if a != b and (a, b) not in self.paths:
                    raise TpiError(f"paths: no route from {a!r} to {b!r} (every ordered pair needs one)")

    def __len__(self) -> int:
        return len(self.devices)

    def rank_of(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise TpiError(f"unknown device {name!r} (devices: {', '.join(d.name for d in self.devices)})")

    def route(self, src_rank: int, dst_rank: int) -> tuple[str, ...]:
        """Link ids from rank src to rank dst, in traversal order."""
        return self.paths[(self.devices[src_rank].name, self.devices[dst_rank].name)]

    def idle_delay_s(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        """One-way delay of a message on idle links, without jitter or loss, store-and-forward per hop.
        For reading and tests; the shaper's model also pipelines packets across hops."""
        return sum(nbytes / self.links[lid].bytes_per_s + self.links[lid].latency_ms / 1e3
                   for lid in self.route(src_rank, dst_rank))


# ---------------------------------------------------------------------------------------------------
# Builders for the named shapes.


def _star(devices: Sequence[Device], link: Link, per_device: Mapping[str, Link]):
    links, paths = {}, {}
    for d in devices:
        access = per_device.get(d.name, link)
        links[f"{d.name}>switch"] = access
        links[f"switch>{d.name}"] = access
    for a in devices:
        for b in devices:
            if a is not b:
                paths[(a.name, b.name)] = (f"{a.name}>switch", f"switch>{b.name}")
    return links, paths


def _klonet(devices: Sequence[Device], link: Link, per_device: Mapping[str, Link]):
    links, paths = {}, {}
    for d in devices:
        own = per_device.get(d.name, link)
        gw = f"gw:{d.name}"
        links[f"{d.name}>{gw}"] = own
        links[f"{gw}>core"] = own
        links[f"core>{gw}"] = own
        links[f"{gw}>{d.name}"] = own
    for a in devices:
        for b in devices:
            if a is not b:
                ga, gb = f"gw:{a.name}", f"gw:{b.name}"
                paths[(a.name, b.name)] = (f"{a.name}>{ga}", f"{ga}>core", f"core>{gb}", f"{gb}>{b.name}")
    return links, paths


def _full(devices: Sequence[Device], link: Link, per_device: Mapping[str, Link]):
    if per_device:
        raise TpiError("per_device: not supported for shape 'full' (list the links explicitly instead)")
    links, paths = {}, {}
    for a in devices:
        for b in devices:
            if a is not b:
                links[f"{a.name}>{b.name}"] = link
                paths[(a.name, b.name)] = (f"{a.name}>{b.name}",)
    return links, paths


_BUILDERS = {"star": _star, "klonet": _klonet, "full": _full}


def make_topology(devices: Sequence[Device], shape: str, link: Link,
                  per_device: Mapping[str, Link] | None = None, name: str = "") -> Topology:
    """A topology of a named shape with the same link everywhere, except per_device[name], which
    replaces all links owned by that device (its access link, both directions; in klonet also its
    gateway's links to the core)."""
    if shape not in _BUILDERS:
        raise TpiError(f"shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
    per_device = dict(per_device or {})
    known = {d.name for d in devices}
    for dev in per_device:
        if dev not in known:
            raise TpiError(f"per_device: unknown device {dev!r} (devices: {', '.join(d.name for d in devices)})")
    links, paths = _BUILDERS[shape](devices, link, per_device)
    return Topology(devices=tuple(devices), links=links, paths=paths, name=name or shape)


# ---------------------------------------------------------------------------------------------------
# YAML loading.

_DEVICE_KEYS = {"name", "cores", "mem_bytes", "disk_read_mbps", "speed"}
_LINK_KEYS = {"latency_ms", "bandwidth_mbps", "jitter_ms", "loss"}


def _prefixed(where: str, fn, *args):
    """Run fn; re-raise its TpiError with `where` prepended to the field path."""
    try:
        return fn(*args)
    except TpiError as e:
        raise TpiError(f"{where}.{e}" if where else str(e)) from None


def _check_keys(doc: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(doc, Mapping):
        raise TpiError(f"{where}: expected a mapping, got {doc!r}")
    for k in doc:
        if k not in allowed:
            raise TpiError(f"{where}.{k}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return dict(doc)


def _device(doc: Any, where: str) -> Device:
    d = _check_keys(doc, _DEVICE_KEYS, where)
    for key in ("name", "cores", "mem_bytes"):
        if key not in d:
            raise TpiError(f"{where}.{key}: missing")

    def build() -> Device:
        disk = d.get("disk_read_mbps")
        return Device(
            name=d["name"], cores=d["cores"], mem_bytes=parse_bytes(d["mem_bytes"], "mem_bytes"),
            disk_read_mbps=None if disk is None else parse_mbps(disk, "disk_read_mbps"),
            speed=d.get("speed", 1.0))

    return _prefixed(where, build)


def _link(doc: Any, where: str, extra: set[str] = frozenset(), base: Link | None = None) -> Link:
    d = _check_keys(doc, _LINK_KEYS | extra, where)
    base = base or Link()

    def build() -> Link:
        return Link(
            latency_ms=parse_ms(d["latency_ms"], "latency_ms") if "latency_ms" in d else base.latency_ms,
            bandwidth_mbps=parse_mbps(d["bandwidth_mbps"], "bandwidth_mbps") if "bandwidth_mbps" in d
            else base.bandwidth_mbps,
            jitter_ms=parse_ms(d["jitter_ms"], "jitter_ms") if "jitter_ms" in d else base.jitter_ms,
            loss=parse_fraction(d["loss"], "loss") if "loss" in d else base.loss)

    return _prefixed(where, build)


def _devices(doc: Any) -> list[Device]:
    if isinstance(doc, list):
        if not doc:
            raise TpiError("devices: need at least one device")
        devices = [_device(d, f"devices[{i}]") for i, d in enumerate(doc)]
        for i, d in enumerate(devices):
            if any(e.name == d.name for e in devices[:i]):
                raise TpiError(f"devices[{i}].name: duplicate device name {d.name!r}")
        return devices
    d = _check_keys(doc, {"count", "template", "name_prefix"}, "devices")
    count = d.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise TpiError(f"devices.count: must be an integer >= 1, got {count!r}")
    template = _check_keys(d.get("template", {}), _DEVICE_KEYS - {"name"}, "devices.template")
    prefix = d.get("name_prefix", "d")
    return [_device({**template, "name": f"{prefix}{i}"}, "devices.template") for i in range(count)]


def topology_from_dict(doc: Any, source: str = "<topology>") -> Topology:
    """Build a Topology from a parsed YAML document; errors start with `source: field.path:`."""
    try:
        doc = _check_keys(doc, {"name", "description", "devices", "links"}, "")
    except TpiError as e:
        raise TpiError(f"{source}: {str(e).lstrip('.')}") from None
    try:
        if "devices" not in doc:
            raise TpiError("devices: missing")
        if "links" not in doc:
            raise TpiError("links: missing")
        devices = _devices(doc["devices"])
        name = str(doc.get("name", Path(source).stem))
        links_doc = doc["links"]
        if isinstance(links_doc, list):
            return _explicit(devices, links_doc, name)
        ld = _check_keys(links_doc, _LINK_KEYS | {"shape", "per_device"}, "links")
        if "shape" not in ld:
            raise TpiError(f"links.shape: missing (one of {', '.join(SHAPES)}, or give links as a list)")
        if ld["shape"] not in SHAPES:
            raise TpiError(f"links.shape: expected one of {', '.join(SHAPES)}, got {ld['shape']!r}")
        link = _link(ld, "links", extra={"shape", "per_device"})
        per_doc = ld.get("per_device") or {}
        if not isinstance(per_doc, Mapping):
            raise TpiError(f"links.per_device: expected a mapping of device name -> link, got {per_doc!r}")
        for dev in per_doc:
            if dev not in {d.name for d in devices}:
                raise TpiError(f"links.per_device.{dev}: unknown device {dev!r} "
                               f"(devices: {', '.join(d.name for d in devices)})")
        per_device = {dev: _link(v, f"links.per_device.{dev}", base=link) for dev, v in per_doc.items()}
        return _prefixed("links", make_topology, devices, ld["shape"], link, per_device, name)
    except TpiError as e:
        raise TpiError(f"{source}: {e}") from None


def _explicit(devices: list[Device], items: list, name: str) -> Topology:
    """links: [{src, dst, both_ways (default true), latency_ms, ...}] -> one direct link per pair."""
    names = [d.name for d in devices]
    links, paths = {}, {}
    for i, item in enumerate(items):
        where = f"links[{i}]"
        d = _check_keys(item, _LINK_KEYS | {"src", "dst", "both_ways"}, where)
        for end in ("src", "dst"):
            if end not in d:
                raise TpiError(f"{where}.{end}: missing")
            if d[end] not in names:
                raise TpiError(f"{where}.{end}: unknown device {d[end]!r} (devices: {', '.join(names)})")
        if d["src"] == d["dst"]:
            raise TpiError(f"{where}.dst: same as src ({d['src']!r})")
        link = _link(d, where, extra={"src", "dst", "both_ways"})
        pairs = [(d["src"], d["dst"])] + ([(d["dst"], d["src"])] if d.get("both_ways", True) else [])
        for a, b in pairs:
            if (a, b) in paths:
                raise TpiError(f"{where}: a link from {a!r} to {b!r} is already listed")
            links[f"{a}>{b}"] = link
            paths[(a, b)] = (f"{a}>{b}",)
    return Topology(devices=tuple(devices), links=links, paths=paths, name=name)


def _apply_override(doc: dict, dotted: str, value: Any) -> None:
    """Set doc[a][b][c] = value for 'a.b.c'; integer parts index lists."""
    parts = dotted.split(".")
    node: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if isinstance(node, list) and part.lstrip("-").isdigit() else part
        if isinstance(node, list):
            if not isinstance(key, int) or not -len(node) <= key < len(node):
                raise TpiError(f"override {dotted!r}: {'.'.join(parts[:i + 1])}: no such list item")
        elif not isinstance(node, dict):
            raise TpiError(f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def load_topology(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Topology:
    """Load a topology YAML file, then apply `overrides` given as dotted keys into the document, e.g.
    {"links.latency_ms": "5ms", "links.bandwidth_mbps": "1gbps", "devices.count": 4}. Overridden keys
    are validated like the file's own."""
    import copy

    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TpiError(f"{path}: cannot read topology file ({e.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TpiError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise TpiError(f"{path}: expected a mapping at the top level")
    doc = copy.deepcopy(doc)
    for key, value in (overrides or {}).items():
        try:
            _apply_override(doc, key, value)
        except TpiError as e:
            raise TpiError(f"{path}: {e}") from None
    return topology_from_dict(doc, str(path))
