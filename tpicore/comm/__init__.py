"""Communication between devices: the wire format, TCP transport, and collectives.

Owns everything that crosses a process boundary at inference time and nothing about the model.
Layering, each module using only the ones above it:

    wire.py         frame header + raw array payload; validated decoding; recv/send loops
    transport.py    Channel (one peer), Group (rendezvous, handshake, HMAC auth, mesh, link hook)
    collectives.py  allreduce (star / ring / tree), broadcast, Collective (the model's `allreduce`)
"""

from tpicore.comm.collectives import ALGOS, Collective, allreduce, broadcast
from tpicore.comm.transport import Channel, Group, LinkHook, open_listener, run_local_processes
from tpicore.comm.wire import Kind, PeerLost, PeerTimeout, ProtocolError

__all__ = [
    "ALGOS", "Channel", "Collective", "Group", "Kind", "LinkHook", "PeerLost", "PeerTimeout", "ProtocolError",
    "allreduce", "broadcast", "open_listener", "run_local_processes",
]
