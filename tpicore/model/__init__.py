"""Layer 1, model: the Llama math and what it is made of, with no I/O.

config.py (one frozen ModelConfig from the checkpoint's own config), llama.py (the forward pass as
plain functions over a weights dict), split.py (each device's share: layouts, block order), tensors.py
(the one table of Llama tensors: shapes, split rules, blocks; `shard_slice`). Imports only numpy and
tpicore.errors; must not import any other tpicore package.
"""
