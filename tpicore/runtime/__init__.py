"""Layer 3, runtime: one process running its share of the model.

device.py (the block loop, timers, the BlockSource protocol, resident weights), env.py (the Clock
protocol, WallClock, DiskModel, DeviceEnv), window.py (the sliding-window scheduler), window_model.py
(its planning model, shared with tools/predictor), window_stats.py (its statistics), ondemand.py
(blocking reads, the offload baseline), report.py (TimeSplit, TraceEvent, RankReport), generate.py
(sampling and the token loop), session.py (GenerateOptions, world size 1), memory.py. Imports model,
weights and comm's LinkHook protocol (a type only); must not open sockets or import tools, dist or cli.
"""
