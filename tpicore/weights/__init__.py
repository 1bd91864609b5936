"""Layer 2, weights: checkpoint files on disk, read as tensors.

checkpoint.py (safetensors headers, memory maps, dtype widening), manifest.py (shard folder manifests),
store.py (a device's tensors by HF name), writer.py (writing folders: atomic publish, the streaming
safetensors writer, manifests, progress). Imports tpicore.model, tpicore.schema and tpicore.errors;
must not import runtime, comm, tools, dist or cli.
"""
