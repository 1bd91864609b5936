"""Layer 4, tools: programs that write or inspect model folders (shard.py, synth/, predictor.py, gguf_synth.py).

Imports model, weights and runtime; must not import comm, dist or cli.
"""
