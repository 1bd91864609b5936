"""Layer: host (above config and net). Per-device limits on this host: cores (affinity + BLAS threads)
and the memory watchdog (limits.py); kernel-enforced memory caps in cgroups v2/v1, only under a root the
user gives (cgroup.py).

Must not import emulator.results, run or figures, nor NumPy.
"""
