"""Layer: config, the emulator's lowest (imports only tpicore). Run configs, topologies and dotted overrides
as validated data (tpicore.schema models; YAML presets in configs/), and the collectives' link model.

    topology.py          devices, directed links, routes; the topology YAML form
    run_config.py        one run: topology, model, workload, options; the run config YAML form
    overrides.py         parse_override / apply_dotted: --set, flags, sweep points, topology overrides
    collective_model.py  hops of each allreduce algorithm, links per route (Fig. 3's model)

Must not import emulator.net, host, results, run or figures, nor start processes or read results.
"""
