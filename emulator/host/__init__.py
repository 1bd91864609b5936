"""Layer: host (above config and net). Per-device limits on this host: cores (affinity + BLAS threads),
memory (a watchdog, or cgroups under a root you own). limits.py.

Must not import emulator.results, run or figures, nor NumPy.
"""
