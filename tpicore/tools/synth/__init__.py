"""Synthetic models (layer: tools; must not import tpicore.dist or tpicore.cli).

presets.py (architecture presets, config.json dicts), tokenizer.py (the synthetic BPE tokenizer),
init.py (random weights, block by block), checkpoint.py (`tpi synth`: an HF checkpoint folder),
unique.py (`tpi synth --devices N --unique-layers K`: shard folders with K distinct layers).
"""
