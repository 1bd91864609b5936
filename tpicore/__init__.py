"""tpicore: tensor-parallel Llama inference in NumPy.

Packages are layers; each imports only the ones below it (no cycles, no function-level imports to
dodge one):

    errors.py, tokenizer.py   leaves (tokenizer: text <-> ids; imports only errors)
    units.py, schema.py       leaves (units: '2GiB', '300mbps', '5ms'; schema: the one config validation,
                              pydantic models -> one TpiError line; import only errors, units, pydantic)
    model/     1  config, Llama math, split table          comm/  1  frames, transport, collectives
    weights/   2  checkpoint files, manifests, stores
    runtime/   3  one device: block loop, window scheduler, generation
    tools/     4  shard, synth, planner
    dist/      5  tensor-parallel and pipeline process groups
    serve/     6  a loaded device group behind an OpenAI-compatible HTTP API, the chat page, `tpi chat`'s backends
    cli/       7  argparse and printing only
"""
