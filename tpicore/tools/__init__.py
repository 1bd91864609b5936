"""Layer 4, tools: programs that write or inspect model folders (shard, synth, planner).

Imports model, weights and runtime; must not import comm, dist or cli.
"""
