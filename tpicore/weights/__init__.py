"""Layer 2, weights: checkpoint files on disk, read as tensors.

checkpoint.py (safetensors headers, memory maps, dtype widening), manifest.py (shard folder manifests),
store.py (a device's tensors by HF name). Imports tpicore.model and tpicore.errors; must not import
runtime, comm, tools, dist or cli.
"""
