"""Layer 3, runtime: one process running its share of the model.

device.py (the block loop, timers, the BlockSource and Clock seams), window.py (the sliding-window
scheduler), ondemand.py, generate.py (sampling and the token loop), session.py (world size 1),
memory.py. Imports model and weights; must not import comm, tools, dist or cli (no sockets here).
"""
