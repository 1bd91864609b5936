"""The emulation testbed: N edge devices as N processes on one host, with emulated links and limits.

    topology.py  devices and directed links as data (YAML presets in configs/topologies/)
    shaper.py    user-space link shaping: the transport's link hook, deadlines per message
    clock.py     wall clock, or a virtual clock per device (CPU time / speed + modelled waits)
    limits.py    cores (affinity, BLAS threads), memory watchdog, cgroups under a root you own
    tc.py        kernel backend: namespaces + veth + bridge + tbf (netem where the kernel has it)

How a launcher wires one device process (rank r):

    schedule = LinkSchedule.create(len(topology.links))          # parent, before starting devices
    ...                                                           # in device r:
    apply_cores(topology.devices[r].cores)                        # before numpy is imported
    clock = VirtualClock(topology.devices[r].speed)               # or WallClock()
    group.link_hook = LinkShaper(topology, schedule, r, clock)
    with clock.compute():
        y = block(x, ...)                                         # CPU time -> virtual time

Nothing here imports NumPy, so apply_cores() still works after `import emulator`.
"""

from emulator.clock import VirtualClock, WallClock
from emulator.limits import DeviceCgroup, MemoryWatchdog, OomEvent, apply_cores, blas_env
from emulator.shaper import LinkSchedule, LinkShaper
from emulator.topology import Device, Link, Topology, load_topology, make_topology, topology_from_dict

__all__ = [
    "Device", "Link", "Topology", "load_topology", "make_topology", "topology_from_dict",
    "LinkSchedule", "LinkShaper", "WallClock", "VirtualClock",
    "apply_cores", "blas_env", "MemoryWatchdog", "OomEvent", "DeviceCgroup",
]
