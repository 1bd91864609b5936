"""Layer net (above config): what "now" means for a device, and the links between devices.

Imports emulator.config and tpicore only; must not import host, results, run, figures or the CLI.

    clock.py      the virtual clock (the wall clock is tpicore.runtime.env's)
    schedule.py   the shared state of one network: link bookings, messages in flight, device progress
    links.py      the link model (per-hop arithmetic, token bucket, jitter and loss draws)
    causal.py     virtual time in virtual-time order: when a message's delivery is final
    shaper.py     LinkShaper, the user-space backend's link hook (wall and virtual clocks)
    kernel.py     the kernel backend: namespaces, bridges or routers, tbf; cleanup on every exit
    hybrid.py     DelayStage, the kernel backend's link hook (latency on top of kernel rate limiting)
    network.py    make_network(kind, topology, clock): either backend, as the launcher wires it
    netrun.py     forked devices on a network (tests and benchmarks)
    scripted.py   devices as threads running scripts through the hook (exact tests of the model)
"""
