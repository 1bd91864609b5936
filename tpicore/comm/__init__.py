"""Layer 1, comm (beside model): the wire format, TCP transport, and collectives.

Imports only tpicore.errors; must not import model, weights, runtime, tools, dist or cli.

Owns everything that crosses a process boundary at inference time and nothing about the model.
Layering, each module using only the ones above it:

    wire.py         frame header + raw array payload; validated decoding; recv/send loops
    transport.py    Channel (one peer), Group (rendezvous, handshake, HMAC auth, mesh, link hook)
    collectives.py  allreduce (star / ring / tree), broadcast, Collective (the model's `allreduce`)
"""
