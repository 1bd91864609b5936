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
"8GiB"; tpicore/units.py). GB/MB are decimal (1e9), GiB/MiB binary (2**30).

Disks: every device has a disk model by default, DEFAULT_DISK_READ_MBPS (2 GB/s, an NVMe-class SSD, the
rate the committed experiments use) and DEFAULT_DISK_LATENCY_MS (0.1 ms per read); every byte a device
reads from its weight files (window and on-demand loads, the first touch of resident weights, embedding
rows) is charged through it on the device's clock. `disk_read_mbps: null` asks for the host's own disk
instead (a read is charged what it took here: host noise enters virtual time).

Profiles: `profile: pi5` (emulator/config/profiles.yaml; emulator/config/compute_model.py) fills a
machine's cores, mem_bytes, disk and its roofline numbers (mem_bandwidth_gbytes_s, peak_gflops); fields
the machine sets itself override the profile's.

Device order is rank order: devices[0] is the master. Records and documents are tpicore.schema models:
errors name the file and the field path. Owns the topology's data and its YAML form; must not import
above emulator.config.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence, Union

from pydantic import Discriminator, Tag, model_validator

from emulator.config.compute_model import profile as device_profile
from emulator.config.overrides import apply_dotted
from tpicore import units
from tpicore.errors import TpiError
from tpicore.schema import (
    Bytes,
    Choice,
    Flag,
    Fraction,
    Int,
    Invalid,
    Mbps,
    Ms,
    Number,
    OptText,
    Record,
    Text,
    check,
    load,
    read_yaml,
)

SHAPES = ("star", "klonet", "full")


def _device_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise Invalid(f"expected letters, digits, '_', '.', '-', got {value!r}")
    return value


# Bounds of every numeric field: far beyond any real edge device or link, so only a typo or an absurd
# value (cores: 1e30) is refused, naming the field and the range, before anything is built
MAX_CORES = 1024
MAX_MEM_BYTES = 2**50  # 1 PiB
MIN_MBPS, MAX_MBPS = 1e-3, 1e7  # 1 kbit/s .. 10 Tbit/s (links and disks)
MIN_SPEED, MAX_SPEED = 1e-3, 1e3  # relative to the reference device
MAX_LINK_MS = 60_000.0  # latency and jitter: one minute

# The fields of a device, shared by Machine and a device template
Cores = Int(1, MAX_CORES)
MemBytes = Bytes(maximum=MAX_MEM_BYTES)
DiskMbps = Mbps(" (or null for unmodelled)", MIN_MBPS, MAX_MBPS)
Speed = Number(gt=0, ge=MIN_SPEED, le=MAX_SPEED)
DEFAULT_DISK_READ_MBPS = 16000.0  # 2 GB/s
DEFAULT_DISK_LATENCY_MS = 0.1


def _opt_rate(value: Any) -> float | None:
    if value is None:
        return None
    v = units.number(value, "")
    if not v > 0:
        raise Invalid(f"must be > 0 (or null), got {value!r}")
    return v


OptRate = Annotated[float | None, check(_opt_rate)]


def with_profile(doc: Any) -> Any:
    """A device mapping with its `profile`'s fields filled in under its own (which win)."""
    if not isinstance(doc, Mapping) or doc.get("profile") is None:
        return doc
    name = doc["profile"]
    if not isinstance(name, str):
        raise Invalid(f"expected a profile name, got {name!r}", field="profile")
    try:
        base = device_profile(name).machine_fields()
    except TpiError as e:
        if str(e).startswith("unknown profile"):
            raise Invalid(str(e), field="profile") from None
        raise  # the profiles file itself is wrong: its error names that file and field
    return {**base, **doc}


# ---------------------------------------------------------------------------------------------------
# The data.


class Machine(Record):
    """One emulated edge device. `speed` is its compute speed relative to the reference device (1.0):
    the virtual clock divides measured CPU time by it."""

    name: Annotated[str, check(_device_name)]
    cores: Cores
    mem_bytes: MemBytes
    disk_read_mbps: DiskMbps = DEFAULT_DISK_READ_MBPS  # megabits/s; None = not modelled (the host's disk speed)
    disk_latency_ms: Ms() = DEFAULT_DISK_LATENCY_MS  # per read, with a modelled rate
    speed: Speed = 1.0
    profile: OptText = None  # a name in emulator/config/profiles.yaml; the fields above override it
    mem_bandwidth_gbytes_s: OptRate = None  # compute: roofline (GB/s)
    peak_gflops: OptRate = None  # compute: roofline (float32 GFLOP/s)

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, doc: Any) -> Any:
        return with_profile(doc)

    @property
    def disk_read_bytes_per_s(self) -> float | None:
        return None if self.disk_read_mbps is None else self.disk_read_mbps * 1e6 / 8


class Link(Record):
    """One directed link. Delay of a message of n bytes on an idle link: n*8/bandwidth + latency.

    jitter_ms: each traversal adds a uniform sample in [-jitter, +jitter] (netem's default
    distribution), never making the delay negative. loss: probability that a packet is lost on this
    link; emulated as a retransmission delay, not a drop (see shaper.py)."""

    latency_ms: Ms(le=MAX_LINK_MS) = 0.0
    bandwidth_mbps: Mbps(" (null for unlimited)", MIN_MBPS, MAX_MBPS) = None  # megabits/s; None = unlimited
    jitter_ms: Ms(le=MAX_LINK_MS) = 0.0
    loss: Fraction() = 0.0

    @property
    def bytes_per_s(self) -> float:
        return math.inf if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8

    @property
    def is_ideal(self) -> bool:
        """Zero latency, unlimited, no jitter or loss: the shaper can skip it entirely."""
        return self.latency_ms == 0 and self.bandwidth_mbps is None and self.jitter_ms == 0 and self.loss == 0

    def link(self) -> "Link":
        """The link fields alone (a YAML form deriving from Link also carries shape, src/dst, ...)."""
        return Link(**{k: getattr(self, k) for k in Link.model_fields})


class Topology(Record):
    """Devices in rank order, directed links by id, and the route (tuple of link ids) for every ordered
    pair of distinct devices, keyed by device names."""

    devices: tuple[Machine, ...]
    links: dict[str, Link]
    paths: dict[tuple[str, str], tuple[str, ...]]
    name: str = ""

    @model_validator(mode="after")
    def _routes(self) -> "Topology":
        if not self.devices:
            raise Invalid("need at least one device", field="devices")
        names = [d.name for d in self.devices]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise Invalid(f"duplicate device name {n!r}", field=f"devices[{i}].name")
        known = set(names)
        for (src, dst), route in self.paths.items():
            where = f"paths[{src!r}, {dst!r}]"
            for end in (src, dst):
                if end not in known:
                    raise Invalid(f"unknown device {end!r} (devices: {', '.join(names)})", field=where)
            if not route:
                raise Invalid("empty route", field=where)
            for lid in route:
                if lid not in self.links:
                    raise Invalid(f"unknown link {lid!r}", field=where)
        for a in names:
            for b in names:
                if a != b and (a, b) not in self.paths:
                    raise Invalid(f"no route from {a!r} to {b!r} (every ordered pair needs one)", field="paths")
        return self

    def __len__(self) -> int:
        return len(self.devices)

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


def _star(devices: Sequence[Machine], link: Link, per_device: Mapping[str, Link]):
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


def _klonet(devices: Sequence[Machine], link: Link, per_device: Mapping[str, Link]):
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


def _full(devices: Sequence[Machine], link: Link, per_device: Mapping[str, Link]):
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


def make_topology(devices: Sequence[Machine], shape: str, link: Link,
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
# The YAML form (configs/topologies/*.yaml)


class DeviceTemplate(Record):
    """devices: {count, template, name_prefix}: `count` devices named <prefix>0.. from one template."""

    cores: Cores
    mem_bytes: MemBytes
    disk_read_mbps: DiskMbps = DEFAULT_DISK_READ_MBPS
    disk_latency_ms: Ms() = DEFAULT_DISK_LATENCY_MS
    speed: Speed = 1.0
    profile: OptText = None
    mem_bandwidth_gbytes_s: OptRate = None
    peak_gflops: OptRate = None

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, doc: Any) -> Any:
        return with_profile(doc)


MAX_DEVICES = 1024  # one process each: a larger count is a typo, refused before anything is built


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_DEVICES:
        raise Invalid(f"must be at most {MAX_DEVICES} (one process per device), got {value}")
    return value


class DeviceCount(Record):
    count: Annotated[Int(1), check(_count)]
    template: DeviceTemplate
    name_prefix: Text = "d"

    def devices(self) -> list[Machine]:
        return [Machine(name=f"{self.name_prefix}{i}", **dict(self.template)) for i in range(self.count)]


class ShapeLinks(Link):
    """links: {shape, <link fields>, per_device: {name: <link fields>}}: the same link everywhere,
    except per_device[name], whose given fields replace the shape link's on every link of that device."""

    shape: Choice(*SHAPES) | None = None
    per_device: dict[str, Link] = {}

    @model_validator(mode="after")
    def _shape_given(self) -> "ShapeLinks":
        if self.shape is None:
            raise Invalid(f"missing (one of {', '.join(SHAPES)}, or give links as a list)", field="shape")
        if self.per_device and self.shape == "full":
            raise Invalid("not supported for shape 'full' (list the links explicitly instead)", field="per_device")
        return self

    def device_links(self) -> dict[str, Link]:
        base = self.link()
        return {dev: base.replace(**{k: getattr(own, k) for k in own.model_fields_set})
                for dev, own in self.per_device.items()}


class ExplicitLink(Link):
    """links: [{src, dst, both_ways (default true), <link fields>}]: one direct link per listed pair."""

    src: str
    dst: str
    both_ways: Flag = True


def _form(value: Any) -> str:
    return "(list)" if isinstance(value, list) else "(mapping)"


class TopologyDoc(Record):
    """A topology file; `topology()` builds the Topology it describes."""

    name: str | None = None
    description: Any = None
    devices: Annotated[Union[Annotated[list[Machine], Tag("(list)")], Annotated[DeviceCount, Tag("(mapping)")]],
                       Discriminator(_form)]
    links: Annotated[Union[Annotated[list[ExplicitLink], Tag("(list)")], Annotated[ShapeLinks, Tag("(mapping)")]],
                     Discriminator(_form)]

    @model_validator(mode="after")
    def _devices_known(self) -> "TopologyDoc":
        names = [d.name for d in self.device_list()]  # empty or duplicate: Topology says so
        if len(names) > MAX_DEVICES:
            raise Invalid(f"{len(names)} devices listed; must be at most {MAX_DEVICES} (one process per device)",
                          field="devices")
        if isinstance(self.links, ShapeLinks):
            for dev in self.links.per_device:
                if dev not in names:
                    raise Invalid(f"unknown device {dev!r} (devices: {', '.join(names)})",
                                  field=f"links.per_device.{dev}")
            return self
        seen = set()
        for i, item in enumerate(self.links):
            for end in ("src", "dst"):
                if getattr(item, end) not in names:
                    raise Invalid(f"unknown device {getattr(item, end)!r} (devices: {', '.join(names)})",
                                  field=f"links[{i}].{end}")
            if item.src == item.dst:
                raise Invalid(f"same as src ({item.src!r})", field=f"links[{i}].dst")
            for pair in [(item.src, item.dst)] + ([(item.dst, item.src)] if item.both_ways else []):
                if pair in seen:
                    raise Invalid(f"a link from {pair[0]!r} to {pair[1]!r} is already listed", field=f"links[{i}]")
                seen.add(pair)
        return self

    def device_list(self) -> list[Machine]:
        return self.devices.devices() if isinstance(self.devices, DeviceCount) else list(self.devices)

    def topology(self, default_name: str) -> Topology:
        devices = self.device_list()
        name = self.name or default_name
        if isinstance(self.links, ShapeLinks):
            return make_topology(devices, self.links.shape, self.links.link(), self.links.device_links(), name)
        links, paths = {}, {}
        for item in self.links:
            for a, b in [(item.src, item.dst)] + ([(item.dst, item.src)] if item.both_ways else []):
                links[f"{a}>{b}"] = item.link()
                paths[(a, b)] = (f"{a}>{b}",)
        return Topology(devices=tuple(devices), links=links, paths=paths, name=name)


def topology_from_dict(doc: Any, source: str = "<topology>") -> Topology:
    """Build a Topology from a parsed YAML document; errors start with `source: field.path:`."""
    parsed = load(TopologyDoc, doc, source)
    try:
        return parsed.topology(Path(source).stem)
    except TpiError as e:
        raise TpiError(f"{source}: {e}") from None


def load_topology(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Topology:
    """Load a topology YAML file, then apply `overrides` given as dotted keys into the document, e.g.
    {"links.latency_ms": "5ms", "links.bandwidth_mbps": "1gbps", "devices.count": 4}. Overridden keys
    are validated like the file's own."""
    path = Path(path)
    doc = read_yaml(path, "topology file")
    if not isinstance(doc, dict):
        raise TpiError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        try:
            apply_dotted(doc, key, value)
        except TpiError as e:
            raise TpiError(f"{path}: {e}") from None
    return topology_from_dict(doc, str(path))
