"""One emulation experiment as data: topology, model, workload, options (a YAML file, e.g. configs/emulate.yaml).

    name: emulate                     # results go to results/<name>.jsonl
    topology: klonet                  # a preset (configs/topologies/<name>.yaml), a path relative to
                                      # this file, or the topology itself inline (see emulator/config/topology.py)
    model:                            # exactly one of synth / path
      synth: small-100m               #   a tpicore.tools.synth preset, written once into .cache/models/<hash>
      layers: null                    #   override its layer count
      unique_layers: null             #   K: store only K distinct layers (layer l = stored layer l mod K),
                                      #   written straight as per-device shard folders (tpicore.tools.synth.unique):
                                      #   70B shapes, real bytes read per token, K/L of the disk; outputs
                                      #   meaningless, timing and memory real (resident weights: see results/record.py)
      dtype: f32                      #   f32 | f16 | bf16 | a ggml type: q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k
                                      #   q6_k (weights stay quantized on disk, dequantized as used; compute f32;
                                      #   without unique_layers written as a synthetic GGUF)
      seed: 0
      # path: /models/llama-2-7b      #   an HF checkpoint folder, or a .gguf file (or split set)
    workload:
      prompt_lengths: [16]            # one run per length per repetition
      new_tokens: 16                  # generated per run (EOS does not stop a run: equal work per run)
      repetitions: 2
      seed: 0                         # prompt token ids: numpy default_rng(seed) over the vocabulary
      prompt: null                    # or a text, tokenized with the model's tokenizer (then prompt_lengths
                                      # is ignored)
    options:
      mode: tpi                       # what runs (emulator/run/baselines.py):
                                      #   tpi          tensor parallel over all devices; allreduce and window as
                                      #                given below (window null = TP without the scheduler)
                                      #   galaxy       tensor parallel, ring allreduce, no window (sets both)
                                      #   pipeline     layers split across the devices (ratios: layer shares),
                                      #                hidden state passed along, weights resident
                                      #   standalone   the first device alone, whole model resident
                                      #   offload      the first device alone, blocks read on demand (blocking)
                                      #   standalone+ms  the first device alone with the window (default 2)
      clock: virtual                  # virtual | wall
      compute: measured               # measured | free | roofline (virtual only): measured = host thread CPU
                                      # time / speed; free = compute costs no time (links and disks only);
                                      # roofline = per block max(bytes / memory bandwidth, flops / peak) from
                                      # each device's mem_bandwidth_gbytes_s and peak_gflops (or its profile)
      shaper: user                    # user | kernel (network namespaces + tbf; needs root and clock: wall)
      allreduce: star                 # star | ring | tree
      window: null                    # sliding-window scheduler: null/none = all weights resident, or >= 2
      retain_every: 0                 # the scheduler's FFN retention (0 = off)
      ratios: equal                   # equal | speed (shares follow devices' speed) | [3, 2, 2, 1]
      mem_cap: null                   # one memory cap for every device ("60MB"); default: each device's mem_bytes
      cgroup_root: null               # a cgroup v2/v1 directory you own: kernel-enforced caps instead of the watchdog
      timeout_s: 60                   # transport timeout (real seconds)
      trace: false                    # per-block events (compute, allreduce, loads) in each results line
      drop_cache: true                # window/offload reads drop the page cache behind them (honest cold
                                      # reads); false re-reads warm data: same results on a virtual clock
                                      # with a modelled disk (loads are charged bytes / disk_read_mbps), less
                                      # real time
      failover: true                  # tpi/galaxy with `faults:`: a lost device is recovered
                                      # (tpicore.dist.elastic), as in `tpi generate`; false: the run fails
      slices: local                   # after a loss, where survivors get their new slice: local = each
                                      # device re-shards its own copy of the model; master = rank 0 sends
                                      # the files over the (emulated) links
    faults:                           # optional: devices lost during the run (issue 15), e.g.
      - {device: 2, at_token: 4, kind: crash}   # device: a worker rank 1..N-1 (topology order);
                                      # at_token: k >= 1: right after the master produced token k of the
                                      # run (token k + 1 sees the loss); 0: before the prompt (the prefill
                                      # step sees it); run: which run of the workload (default 0);
                                      # kind: crash (SIGKILL) | hang (SIGSTOP; SIGCONT after duration_s if
                                      # given, the process then finds its group gone and exits) | link_down
                                      # (every frame the device sends or receives is held until duration_s
                                      # has passed: silent beyond options.timeout_s = lost, else a stall)
                                      # Faults need a tensor-parallel mode, clock: wall (a lost rank would
                                      # hold the virtual-clock link schedule back; detection and recovery are
                                      # host time) and a model without unique_layers (the survivors re-shard
                                      # the model). After a loss the emulated links follow group ranks (rank
                                      # r uses device r's links): exact when the workers' links are alike.

A mode fixes what it names and the results record the options as run: galaxy sets allreduce ring and no
window; pipeline, standalone and offload run without a window; standalone+ms takes the window given
(2 if none). The one-device modes use topology.devices[0] alone (links unused, ratios ignored).

Overrides (`--set KEY=VALUE`, VALUE read as YAML) are dotted paths into this document; `devices.*` and
`links.*` are short for `topology.devices.*` and `topology.links.*`. A topology given by name or path is
read into the document first, so overrides reach into it and results record the topology as run.
Everything is validated before any process starts (tpicore.schema models); errors name the file and the
field. Owns the run config's data and its YAML form; must not import above emulator.config.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import field_validator, model_validator

from emulator.config.compute_model import COMPUTE
from emulator.config.overrides import apply_dotted
from emulator.config.topology import MAX_MEM_BYTES, Topology, topology_from_dict
from tpicore.comm.channel import DEFAULT_TIMEOUT_S
from tpicore.errors import TpiError
from tpicore.schema import (
    Bytes,
    Choice,
    Flag,
    Int,
    Invalid,
    Number,
    OptInt,
    OptText,
    Record,
    check,
    is_int,
    is_number,
    load,
    read_yaml,
)
from tpicore.tools.synth.init import DTYPES as SYNTH_DTYPES
from tpicore.weights.quant import BLOCK_TAGS

MODEL_DTYPES = (*SYNTH_DTYPES, *(t.lower() for t in BLOCK_TAGS))  # f32 f16 bf16 q8_0 q4_0 ... q6_k
from tpicore.tools.synth.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, results/, .cache/
TOPOLOGY_DIR = ROOT / "configs" / "topologies"

CLOCKS = ("virtual", "wall")
SHAPERS = ("user", "kernel")  # emulator/net/network.py: the user-space shaper, or the kernel backend
ALLREDUCE = ("star", "ring", "tree")
MODES = ("tpi", "galaxy", "pipeline", "standalone", "offload", "standalone+ms")
SINGLE_DEVICE_MODES = ("standalone", "offload", "standalone+ms")
SECTIONS = ("name", "topology", "model", "workload", "options", "faults")

# Bounds of every numeric field (topology.py has the devices' and links'): far past any real run, so only a
# typo or an absurd value (layers: 1e30) is refused, naming the file, the field and the range
MAX_LAYERS = 1024  # Llama 3.1 405B has 126
MAX_TOKENS = 131_072  # a prompt length or new tokens: Llama 3.1's context
MAX_REPETITIONS = 10_000
MAX_SEED = 2**63 - 1
MAX_WINDOW = 2 * MAX_LAYERS + 2  # blocks: every layer's two, the embedding and the head
MAX_TIMEOUT_S = 86_400.0  # one day
MAX_SHARE = 1e6  # one device's ratio
MAX_DOWN_S = 86_400.0  # a fault's duration_s
FAULT_KINDS = ("crash", "hang", "link_down")
SLICES = ("local", "master")


class ModelSpec(Record):
    """Which checkpoint: an HF folder or GGUF file (`path`) or a synthetic preset (`synth`, + layers/dtype/seed)."""

    path: OptText = None
    synth: OptText = None
    layers: OptInt(1, MAX_LAYERS) = None
    unique_layers: OptInt(1, MAX_LAYERS) = None
    dtype: Choice(*MODEL_DTYPES) = "f32"
    seed: Int(0, MAX_SEED) = 0

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.path is None) == (self.synth is None):
            raise Invalid(f"give exactly one (a checkpoint folder, or a synthetic preset), "
                          f"got path={self.path!r}, synth={self.synth!r}", field="path/synth")
        if self.synth is not None and self.synth not in PRESETS:
            raise Invalid(f"unknown preset {self.synth!r} (presets: {', '.join(PRESETS)})", field="synth")
        if self.path is not None and (self.layers is not None or self.unique_layers is not None
                                      or self.dtype != "f32" or self.seed != 0):
            raise Invalid("apply to synth only (a checkpoint folder is used as it is)",
                          field="layers/unique_layers/dtype/seed")
        if self.unique_layers is not None:
            n = self.layers or PRESETS[self.synth]["num_hidden_layers"]
            if self.unique_layers > n:
                raise Invalid(f"{self.unique_layers} is more than the model's {n} layers", field="unique_layers")
        return self

    @property
    def unique(self) -> bool:
        return self.unique_layers is not None


class Workload(Record):
    """The prompt set: one run per (prompt length, repetition), each generating `new_tokens`."""

    prompt_lengths: tuple[Int(1, MAX_TOKENS), ...] = (16,)
    new_tokens: Int(1, MAX_TOKENS) = 16
    repetitions: Int(1, MAX_REPETITIONS) = 2
    seed: Int(0, MAX_SEED) = 0
    prompt: OptText = None

    @field_validator("prompt_lengths", mode="before")
    @classmethod
    def _lengths(cls, value: Any) -> Any:
        if is_int(value):
            return (value,)
        if not isinstance(value, (list, tuple)) or not value:
            raise Invalid(f"expected a non-empty list of integers, got {value!r}")
        return tuple(value)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(prompt length or 0 for the text prompt, repetition) in run order."""
        lengths = (0,) if self.prompt is not None else self.prompt_lengths
        return [(n, rep) for n in lengths for rep in range(self.repetitions)]


def _ratios(value: Any) -> str | tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise Invalid("empty list")
        for i, r in enumerate(value):
            if not is_number(r) or r <= 0:
                raise Invalid(f"must be a number > 0, got {r!r}", field=f"[{i}]")
            if r > MAX_SHARE:
                raise Invalid(f"must be a number in (0, {MAX_SHARE:g}], got {r:g}", field=f"[{i}]")
        if not math.isfinite(sum(float(r) for r in value)):
            raise Invalid(f"shares too large: their total overflows, got {list(value)}")
        return tuple(float(r) for r in value)
    if value not in ("equal", "speed"):
        raise Invalid(f"expected equal, speed or a list of numbers, got {value!r}")
    return value


def _cgroup_root(value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and Path(value).is_dir()):
        raise Invalid(f"{value} is not a directory")
    return value


class Options(Record):
    mode: Choice(*MODES) = "tpi"
    clock: Choice(*CLOCKS) = "virtual"
    compute: Choice(*COMPUTE) = "measured"
    shaper: Choice(*SHAPERS) = "user"
    allreduce: Choice(*ALLREDUCE) = "star"
    window: OptInt(2, MAX_WINDOW) = None
    retain_every: Int(0, MAX_LAYERS) = 0
    private_layers: Int(0, MAX_LAYERS) = 0  # tensor-parallel modes: layers 0..K-1 on the master alone
    ratios: Annotated[str | tuple[float, ...], check(_ratios)] = "equal"
    mem_cap: Bytes(optional=True, maximum=MAX_MEM_BYTES) = None  # bytes
    cgroup_root: Annotated[str | None, check(_cgroup_root)] = None
    timeout_s: Number(gt=0, le=MAX_TIMEOUT_S) = DEFAULT_TIMEOUT_S  # transport timeout (real seconds)
    trace: Flag = False
    drop_cache: Flag = True
    failover: Flag = True  # tpi/galaxy with faults: recover from a lost device (tpicore.dist.elastic)
    slices: Choice(*SLICES) = "local"  # after a loss: each device re-shards its own model copy, or rank 0 sends

    @model_validator(mode="before")
    @classmethod
    def _mode_fixes(cls, doc: Any) -> Any:
        """The mode fixes what it names (see the module docstring); results record the options as run."""
        if not isinstance(doc, Mapping):
            return doc
        doc = dict(doc)
        window = doc.get("window")
        if isinstance(window, str) and window.strip().lower() in ("none", "null", "off", ""):
            doc["window"] = None
        mode = doc.get("mode", "tpi")
        if mode == "galaxy":
            doc["allreduce"] = "ring"
        if mode in ("galaxy", "pipeline", "standalone", "offload"):
            doc["window"], doc["retain_every"] = None, 0
        elif mode == "standalone+ms" and doc.get("window") is None:
            doc["window"] = 2
        return doc

    @model_validator(mode="after")
    def _consistent(self) -> "Options":
        if self.compute in ("free", "roofline") and self.clock != "virtual":
            raise Invalid(f"'{self.compute}' needs clock: virtual (a wall clock cannot replace compute)",
                          field="compute")
        if self.shaper == "kernel" and self.clock != "wall":
            raise Invalid("'kernel' needs clock: wall (the kernel shapes in real time)", field="shaper")
        if self.retain_every and self.window is None:
            raise Invalid(f"{self.retain_every} needs a window (retention is part of the scheduler)",
                          field="retain_every")
        return self

    @property
    def single_device(self) -> bool:
        return self.mode in SINGLE_DEVICE_MODES

    @property
    def tensor_parallel(self) -> bool:
        return self.mode in ("tpi", "galaxy")


class Fault(Record):
    """One device lost during a run (see `faults:` in the module docstring)."""

    device: Int(1, MAX_LAYERS)  # a worker rank (checked against the topology in RunConfig)
    at_token: Int(0, MAX_TOKENS)  # 0: before the prompt; k: right after the master produced token k
    kind: Choice(*FAULT_KINDS)
    duration_s: Number(gt=0, le=MAX_DOWN_S) | None = None  # hang: SIGCONT after it; link_down: required
    run: Int(0, MAX_REPETITIONS * MAX_LAYERS) = 0  # the run of the workload (its order) it happens in

    @model_validator(mode="after")
    def _duration(self) -> "Fault":
        if self.kind == "link_down" and self.duration_s is None:
            raise Invalid("missing: a link_down lasts duration_s seconds", field="duration_s")
        if self.kind == "crash" and self.duration_s is not None:
            raise Invalid("a crash has no duration (the process is gone)", field="duration_s")
        return self


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise Invalid(f"expected a plain file name for results/<name>.jsonl, got {value!r}")
    return value


class RunConfigDoc(Record):
    """A run config file after its topology is read in and overrides are applied (the topology is
    validated on its own, as `<source>: topology: ...`)."""

    name: Annotated[str, check(_name)]
    topology: dict
    model: ModelSpec | None = None
    workload: Workload = Workload()
    options: Options = Options()
    faults: tuple[Fault, ...] = ()

    @field_validator("faults", mode="before")
    @classmethod
    def _no_faults(cls, value: Any) -> Any:
        return () if value is None else value

    @field_validator("model", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    @field_validator("workload", "options", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _model_given(self) -> "RunConfigDoc":
        if self.model is None:
            raise Invalid("missing (synth: PRESET or path: DIR)", field="model")
        return self


class RunConfig(Record):
    """A validated experiment. `doc` is the resolved document (topology inline, overrides applied)."""

    name: str
    source: str
    topology: Topology
    model: ModelSpec
    workload: Workload
    options: Options
    doc: dict
    faults: tuple[Fault, ...] = ()

    @model_validator(mode="after")
    def _roofline_numbers(self) -> "RunConfig":
        if self.options.compute == "roofline":
            for i, d in enumerate(self.topology.devices):
                for f, value in (("mem_bandwidth_gbytes_s", d.mem_bandwidth_gbytes_s), ("peak_gflops", d.peak_gflops)):
                    if value is None:
                        raise Invalid("missing: compute roofline needs it (give it, or a profile: "
                                      "emulator/config/profiles.yaml)", field=f"topology.devices[{i}].{f}")
        return self

    @model_validator(mode="after")
    def _ratios_fit(self) -> "RunConfig":
        ratios = self.options.ratios
        if isinstance(ratios, tuple) and len(ratios) != len(self.topology):
            raise Invalid(f"{len(ratios)} values for {len(self.topology)} devices", field="options.ratios")
        return self

    @model_validator(mode="after")
    def _faults_fit(self) -> "RunConfig":
        seen: set[int] = set()
        for i, f in enumerate(self.faults):
            where = f"faults[{i}]"
            if not self.options.tensor_parallel:
                raise Invalid(f"options.mode {self.options.mode!r} has no device to lose (faults need tpi or galaxy)",
                              field=f"{where}.device")
            if f.device >= len(self.topology):
                raise Invalid(f"{f.device} is not a worker rank (1..{len(self.topology) - 1} on "
                              f"{len(self.topology)} devices)", field=f"{where}.device")
            if f.device in seen:
                raise Invalid(f"device {f.device} is lost twice", field=f"{where}.device")
            seen.add(f.device)
            if f.at_token >= self.workload.new_tokens:
                raise Invalid(f"{f.at_token}: the run generates {self.workload.new_tokens} tokens (0..."
                              f"{self.workload.new_tokens - 1}: a later token would see the loss)",
                              field=f"{where}.at_token")
            if f.run >= len(self.workload.runs):
                raise Invalid(f"{f.run}: the workload has {len(self.workload.runs)} runs", field=f"{where}.run")
            if self.options.clock != "wall":
                raise Invalid("needs options.clock: wall (a lost device would hold the virtual clock's causal link "
                              "schedule back, and detection and recovery are host time)", field=f"{where}.kind")
            if self.model.unique:
                raise Invalid("needs a model without unique_layers (the survivors re-shard the model)",
                              field=f"{where}.kind")
        return self

    @property
    def world_size(self) -> int:
        return len(self.topology)

    def ratios(self) -> list[float] | None:
        """Per-device shares for sharding, or None for equal."""
        r = self.options.ratios
        if r == "equal" or self.world_size == 1:
            return None
        if r == "speed":
            return [d.speed for d in self.topology.devices]
        return list(r)

    def to_json(self) -> dict:
        """The fully resolved experiment, as recorded in every results line."""
        topo = self.topology
        return {
            "name": self.name, "source": self.source,
            "topology": {"name": topo.name, "doc": self.doc["topology"],
                         "devices": [d.model_dump() for d in topo.devices],
                         "links": {lid: link.model_dump() for lid, link in sorted(topo.links.items())}},
            "model": self.model.model_dump(),
            "workload": {**self.workload.model_dump(), "prompt_lengths": list(self.workload.prompt_lengths)},
            "options": {**self.options.model_dump(),
                        "ratios": self.options.ratios if isinstance(self.options.ratios, str)
                        else list(self.options.ratios)},
            **({"faults": [f.model_dump() for f in self.faults]} if self.faults else {}),
        }


def first_device(topology: Topology) -> Topology:
    """The one-device modes: the first device alone, with its own links (for the record)."""
    first = topology.devices[0]
    own = {lid: link for lid, link in topology.links.items() if first.name in lid.split(">")}
    return Topology(devices=(first,), links=own or dict(topology.links), paths={}, name=topology.name)


# ---------------------------------------------------------------------------------------------------
# Loading


def set_key(doc: dict, key: str, value: Any) -> None:
    """One override into a run config document: `devices.*` and `links.*` are short for `topology.*`."""
    parts = key.split(".")
    if parts[0] in ("devices", "links"):
        parts = ["topology"] + parts
    if parts[0] not in SECTIONS:
        raise TpiError(f"--set {key}: unknown section {parts[0]!r} "
                       f"(one of {', '.join(SECTIONS)}, or devices/links for the topology)")
    apply_dotted(doc, ".".join(parts), value)


def resolve_topology_ref(ref: str, base: Path) -> Path:
    """A topology given as a string: a preset name (configs/topologies/<name>.yaml) or a path
    relative to the run config's folder."""
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        path = TOPOLOGY_DIR / f"{ref}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml"))
            raise TpiError(f"topology: unknown preset {ref!r} (presets: {', '.join(names)}; or give a path)")
        return path
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base / path


def _resolve(raw: Any, source: str, base: Path, overrides: Sequence[tuple[str, Any]]) -> dict:
    """The document with its topology read in and the overrides applied (not validated yet)."""
    if not isinstance(raw, Mapping):
        raise TpiError(f"{source}: expected a mapping at the top level")
    doc = copy.deepcopy(dict(raw))
    try:
        for key, value in overrides:  # a whole new topology first, so overrides can reach into it
            if key == "topology":
                doc["topology"] = value
        topo = doc.get("topology")
        if topo is None:
            raise TpiError("topology: missing (a preset name like klonet, a path, or a mapping)")
        if isinstance(topo, str):
            tpath = resolve_topology_ref(topo, base)
            loaded = read_yaml(tpath, "topology file")
            if not isinstance(loaded, Mapping):
                raise TpiError(f"topology: {tpath} does not hold a mapping")
            doc["topology"] = dict(loaded)
            doc["topology"].setdefault("name", tpath.stem)
        elif not isinstance(topo, Mapping):
            raise TpiError(f"topology: expected a preset name, a path or a mapping, got {topo!r}")
        for key, value in overrides:
            if key != "topology":
                set_key(doc, key, value)
    except TpiError as e:
        raise TpiError(f"{source}: {e}") from None
    return doc


def load_run_config(path: str | Path | None, overrides: Sequence[tuple[str, Any]] = (),
                    doc: Mapping | None = None, source: str | None = None,
                    base_dir: str | Path | None = None) -> RunConfig:
    """Read, override, validate. `doc` instead of `path` builds from a mapping (tests, the CLI, the points
    of an experiment: then `source` names it in errors and relative paths start at `base_dir`)."""
    if doc is None:
        path = Path(path)
        raw, source, base = read_yaml(path, "run config"), str(path), path.parent
        default_name = path.stem
    else:
        raw, source = doc, source or "<run config>"
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        default_name = "emulate"
    resolved = _resolve(raw, source, base, overrides)
    parsed = load(RunConfigDoc, {"name": default_name, **resolved}, source)
    topology = topology_from_dict(resolved["topology"], f"{source}: topology")
    model, options = parsed.model, parsed.options
    if model.path is not None and not Path(model.path).expanduser().is_absolute():  # relative to the file
        model = ModelSpec(path=str((base / Path(model.path).expanduser()).resolve()))
    if options.single_device and len(topology) > 1:  # the first device alone
        topology, options = first_device(topology), options.replace(ratios="equal")
    return load(RunConfig, dict(name=parsed.name, source=source, topology=topology, model=model,
                                workload=parsed.workload, options=options, doc=resolved, faults=parsed.faults),
                source)


def resolved_doc(doc: Mapping, overrides: Sequence[tuple[str, Any]]) -> dict:
    """A run config document with overrides applied as load_run_config would, validated (for an
    experiment's `set:`, `smoke.base` and command-line --set on its base)."""
    return load_run_config(None, overrides, doc=doc).doc
