"""The emulation testbed: N edge devices as N processes on one host, with emulated links and limits.

Packages are layers; each imports only the ones above it in this list (and tpicore, never the reverse):

    config/   units, topologies and run configs as validated data (YAML presets in configs/)
    net/      clocks (wall / virtual) and link shaping (user-space shaper, kernel backend)
    host/     cores, memory watchdog, cgroups under a root you own
    results/  the typed results line, JSONL I/O, summaries
    run/      one run (launcher), the baselines, experiments (sweeps), the allreduce sweep
    figures/  plots, reading only results/
    cli.py    `python -m emulator ...`: argparse and printing only

Nothing at package level imports NumPy, so host.limits.apply_cores() still works after `import emulator`.
"""
