"""tpicore: tensor-parallel Llama inference in NumPy.

Packages are layers; each imports only the ones below it (no cycles, no function-level imports to
dodge one):

    errors.py, tokenizer.py   leaves (tokenizer: text <-> ids; imports only errors)
    model/     1  config, Llama math, split table          comm/  1  frames, transport, collectives
    weights/   2  checkpoint files, manifests, stores
    runtime/   3  one device: block loop, window scheduler, generation
    tools/     4  shard, synth, planner
    dist/      5  tensor-parallel and pipeline process groups
    cli/       6  argparse and printing only
"""
