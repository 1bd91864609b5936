"""Layer: figures (above results; imports emulator.results, emulator.config and tpicore only). The paper's
figures drawn from results/*.jsonl and configs/paper_tables.yaml, and nothing else:

    plot.py         the registry (experiment -> figure function, kind of line) and `python -m emulator plot`
    data.py         records -> sweep points and their coordinates; the paper's memory formula
    style.py        colours, bars, lines, caption, the atomic PNG write (matplotlib Figure + Agg, no pyplot)
    fig1_fig3.py    Fig. 1 (timeline, memory), Fig. 3 (allreduce latency)
    tables.py       Table 1, Tables 2/6, Fig. 6, Tables 3/8 (the paper's numbers beside ours)
    sweeps.py       Fig. 5, window, link-latency and device-count sweeps
    stalls.py       predicted vs measured stall per token
    quantized.py    quantized weights (f32 / bf16 / q8_0 / q4_k) at 70B shapes beside the paper's Table 1
    failover.py     a lost device: the recovery's split and the token latencies around it (issue 15)

Must not import emulator.run, net, host or cli, nor run experiments or write results.
"""
