"""Layer 1, comm (beside model): frames, sealed channels, handshakes, groups, collectives.

Imports only tpicore.errors (and third-party packages); must not import model, weights, runtime, tools,
dist or cli. Owns everything that crosses a process boundary at inference time and nothing about the
model (a fingerprint is an opaque string here). Each module uses only the ones above it:

    frame.py        bytes only: header layout, validation, timestamp extension, JSON payloads
    seal.py         per-direction keys (HKDF-SHA256) and ChaCha20-Poly1305 with sequence-number nonces
    channel.py      one peer: whole frames over one socket, sealed or plain; link hook; DEFAULT_TIMEOUT_S
    duplex.py       send and receive at once (ring steps), no threads
    endpoint.py     listen, connect, parse addresses, is_loopback
    handshake.py    HELLO / CHALLENGE / AUTH / WELCOME on one connection: authentication and keys
    admission.py    a listener's handshakes, concurrent and each under its own short deadline
    group.py        Group: a rank's channels; master/worker rendezvous and the mesh
    collectives.py  allreduce (star / ring / tree), broadcast, Collective (the model's `allreduce`)
    local.py        whole groups on localhost (threads or forked processes) for tests and benchmarks
"""
