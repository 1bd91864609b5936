"""Compute models (what a block costs on a device's virtual clock) and device profiles as data.

Layer: config (imports tpicore.model.cost for `Work`, tpicore.schema, tpicore.errors). Owns the three
compute modes of `options.compute` and the profiles file (emulator/config/profiles.yaml). The virtual
clock (emulator/net/clock.py) asks its model for the seconds of each piece of work; topologies
(emulator/config/topology.py) fill a machine's fields from `profile: <name>`. Must not measure, time
or import above config.

    measured   the host thread's CPU time / the device's speed (what the host did, scaled)
    free       nothing: compute costs no virtual time (links and disks only)
    roofline   per piece of work max(bytes / memory bandwidth, flops / peak): deterministic, from the
               device's profile (mem_bandwidth_gbytes_s, peak_gflops) and the block's Work
               (tpicore.model.cost, from the one tensor table)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from pydantic import RootModel

from tpicore.errors import TpiError
from tpicore.model.cost import Work
from tpicore.schema import Bytes, Int, Mbps, Ms, Number, Record, Text, load, read_yaml

COMPUTE = ("measured", "free", "roofline")
PROFILES_PATH = Path(__file__).resolve().parent / "profiles.yaml"


class ComputeModel(Protocol):
    def seconds(self, cpu_s: float, work: Work) -> float:
        """Virtual seconds for a piece of work that took `cpu_s` of host thread CPU time."""


@dataclass(frozen=True)
class Measured:
    speed: float = 1.0

    def seconds(self, cpu_s: float, work: Work) -> float:
        return cpu_s / self.speed


@dataclass(frozen=True)
class Free:
    def seconds(self, cpu_s: float, work: Work) -> float:
        return 0.0


@dataclass(frozen=True)
class Roofline:
    mem_bandwidth_gbytes_s: float
    peak_gflops: float

    def seconds(self, cpu_s: float, work: Work) -> float:
        return max(work.nbytes / (self.mem_bandwidth_gbytes_s * 1e9), work.flops / (self.peak_gflops * 1e9))


# ---------------------------------------------------------------------------------------------------
# Profiles


class DeviceProfile(Record):
    """One device kind (see profiles.yaml for the fields' units and sources)."""

    description: Text
    cores: Int(1)
    mem_bytes: Bytes()
    mem_bandwidth_gbytes_s: Number(gt=0)
    peak_gflops: Number(gt=0)
    disk_read_mbps: Mbps()
    disk_latency_ms: Ms()
    nic_mbps: Mbps()
    sources: tuple[Text, ...]

    def machine_fields(self) -> dict:
        """The fields a topology machine takes from this profile (nic_mbps and the texts stay here)."""
        return {k: getattr(self, k) for k in ("cores", "mem_bytes", "mem_bandwidth_gbytes_s", "peak_gflops",
                                              "disk_read_mbps", "disk_latency_ms")}


class ProfilesDoc(RootModel[dict[str, DeviceProfile]]):
    pass


@lru_cache(maxsize=8)
def load_profiles(path: Path = PROFILES_PATH) -> dict[str, DeviceProfile]:
    """The profiles in `path`; a TpiError '<path>: <name>.<field>: ...' when one does not fit."""
    doc = read_yaml(path, "device profiles")
    if not isinstance(doc, dict) or not doc:
        raise TpiError(f"{path}: expected a mapping of profile names to profiles")
    for name, entry in doc.items():
        if isinstance(entry, dict) and "sources" in entry and not entry["sources"]:
            raise TpiError(f"{path}: {name}.sources: empty (every profile cites where its numbers come from)")
    return dict(load(ProfilesDoc, doc, str(path)).root)


def profile(name: str, path: Path = PROFILES_PATH) -> DeviceProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise TpiError(f"unknown profile {name!r} (profiles in {path.name}: {', '.join(profiles)})")
    return profiles[name]


def model_for(mode: str, speed: float, mem_bandwidth_gbytes_s: float | None,
              peak_gflops: float | None) -> ComputeModel:
    """The compute model of options.compute `mode` for one device."""
    if mode == "free":
        return Free()
    if mode == "measured":
        return Measured(speed)
    if mode == "roofline":
        if mem_bandwidth_gbytes_s is None or peak_gflops is None:
            raise TpiError("compute roofline: the device needs mem_bandwidth_gbytes_s and peak_gflops "
                           "(give them, or a profile)")
        return Roofline(mem_bandwidth_gbytes_s, peak_gflops)
    raise TpiError(f"compute: expected one of {', '.join(COMPUTE)}, got {mode!r}")
