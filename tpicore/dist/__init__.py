"""Layer 5, dist: devices as processes that talk (tensor parallel and pipeline).

Imports every lower layer (model, weights, runtime, comm, tools); must not import cli.
"""
