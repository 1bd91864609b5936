"""Layer: run (above config, net, host, results). Runs emulation experiments:

    launcher.py        Run: one run config, start to finish (results lines, exit code)
    supervisor.py      the device processes of one run: fork behind gates, limits, watch, reap
    device.py          what runs inside each device process (limits, clock, links, the mode's role)
    baselines.py       the six modes (tpi, galaxy, pipeline, standalone, offload, standalone+ms) as drivers
    model_cache.py     model and shard folders, synthesized once into .cache/
    experiments.py     experiment files (a base run config and a sweep), reproduce
    allreduce_sweep.py Fig. 3: the allreduce latency sweep (runner: allreduce)

Must not import emulator.figures or emulator.cli (figures are drawn through a callback the CLI passes).
"""
