"""One emulation experiment as data: topology, model, workload, options (a YAML file, e.g. configs/emulate.yaml).

    name: emulate                     # results go to results/<name>.jsonl
    topology: klonet                  # a preset (configs/topologies/<name>.yaml), a path relative to
                                      # this file, or the topology itself inline (see emulator/topology.py)
    model:                            # exactly one of synth / path
      synth: small-100m               #   a tpicore.synth preset, written once into .cache/models/<hash>
      layers: null                    #   override its layer count
      unique_layers: null             #   K: store only K distinct layers (layer l = stored layer l mod K),
                                      #   written straight as per-device shard folders (tpicore.unique_synth):
                                      #   70B shapes, real bytes read per token, K/L of the disk; outputs
                                      #   meaningless, timing and memory real (resident weights: see report.py)
      dtype: f32                      #   f32 | f16 | bf16 (compute is always f32)
      seed: 0
      # path: /models/llama-2-7b      #   an HF checkpoint folder
    workload:
      prompt_lengths: [16]            # one run per length per repetition
      new_tokens: 16                  # generated per run (EOS does not stop a run: equal work per run)
      repetitions: 2
      seed: 0                         # prompt token ids: numpy default_rng(seed) over the vocabulary
      prompt: null                    # or a text, tokenized with the model's tokenizer (then prompt_lengths
                                      # is ignored)
    options:
      mode: tpi                       # what runs (emulator/baselines.py):
                                      #   tpi          tensor parallel over all devices; allreduce and window as
                                      #                given below (window null = TP without the scheduler)
                                      #   galaxy       tensor parallel, ring allreduce, no window (sets both)
                                      #   pipeline     layers split across the devices (ratios: layer shares),
                                      #                hidden state passed along, weights resident
                                      #   standalone   the first device alone, whole model resident
                                      #   offload      the first device alone, blocks read on demand (blocking)
                                      #   standalone+ms  the first device alone with the window (default 2)
      clock: virtual                  # virtual | wall
      compute: measured               # measured | free (virtual only: compute costs no time, links only)
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

A mode fixes what it names and the results record the options as run: galaxy sets allreduce ring and no
window; pipeline, standalone and offload run without a window; standalone+ms takes the window given
(2 if none). The one-device modes use topology.devices[0] alone (links unused, ratios ignored).

Overrides (`--set KEY=VALUE`, VALUE read as YAML) are dotted paths into this document; `devices.*` and
`links.*` are short for `topology.devices.*` and `topology.links.*`. A topology given by name or path is
read into the document first, so overrides reach into it and results record the topology as run.
Everything is validated before any process starts; errors name the file and the field.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from emulator.config.topology import Topology, parse_bytes, topology_from_dict
from tpicore.errors import TpiError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, results/, .cache/
TOPOLOGY_DIR = ROOT / "configs" / "topologies"

CLOCKS = ("virtual", "wall")
COMPUTE = ("measured", "free")
ALLREDUCE = ("star", "ring", "tree")
MODES = ("tpi", "galaxy", "pipeline", "standalone", "offload", "standalone+ms")
SINGLE_DEVICE_MODES = ("standalone", "offload", "standalone+ms")
DTYPES = ("f32", "f16", "bf16")
SECTIONS = ("name", "topology", "model", "workload", "options")


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TpiError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise TpiError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _keys(doc: Any, allowed: Sequence[str], where: str) -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise TpiError(f"{where}: expected a mapping, got {doc!r}")
    for k in doc:
        if k not in allowed:
            raise TpiError(f"{where + '.' if where else ''}{k}: unknown key (allowed: {', '.join(allowed)})")
    return dict(doc)


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint: an HF folder (`path`) or a synthetic preset (`synth`, + layers/dtype/seed)."""

    path: str | None = None
    synth: str | None = None
    layers: int | None = None
    unique_layers: int | None = None
    dtype: str = "f32"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.path is None) == (self.synth is None):
            raise TpiError(f"path/synth: give exactly one (a checkpoint folder, or a synthetic preset), "
                           f"got path={self.path!r}, synth={self.synth!r}")
        if self.synth is not None:
            from tpicore.tools.synth import PRESETS

            if self.synth not in PRESETS:
                raise TpiError(f"synth: unknown preset {self.synth!r} (presets: {', '.join(PRESETS)})")
        if self.path is not None and not isinstance(self.path, str):
            raise TpiError(f"path: expected a folder name, got {self.path!r}")
        if self.layers is not None:
            _int(self.layers, "layers", 1)
        _choice(self.dtype, "dtype", DTYPES)
        _int(self.seed, "seed", 0)
        if self.path is not None and (self.layers is not None or self.unique_layers is not None
                                      or self.dtype != "f32" or self.seed != 0):
            raise TpiError("layers/unique_layers/dtype/seed: apply to synth only (a checkpoint folder is used "
                           "as it is)")
        if self.unique_layers is not None:
            from tpicore.tools.synth import PRESETS

            _int(self.unique_layers, "unique_layers", 1)
            n = self.layers or PRESETS[self.synth]["num_hidden_layers"]
            if self.unique_layers > n:
                raise TpiError(f"unique_layers: {self.unique_layers} is more than the model's {n} layers")

    @property
    def unique(self) -> bool:
        return self.unique_layers is not None


@dataclass(frozen=True)
class Workload:
    """The prompt set: one run per (prompt length, repetition), each generating `new_tokens`."""

    prompt_lengths: tuple[int, ...] = (16,)
    new_tokens: int = 16
    repetitions: int = 2
    seed: int = 0
    prompt: str | None = None

    def __post_init__(self) -> None:
        lengths = self.prompt_lengths
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            lengths = (lengths,)
        if not isinstance(lengths, (list, tuple)) or not lengths:
            raise TpiError(f"prompt_lengths: expected a non-empty list of integers, got {self.prompt_lengths!r}")
        for i, n in enumerate(lengths):
            _int(n, f"prompt_lengths[{i}]", 1)
        object.__setattr__(self, "prompt_lengths", tuple(lengths))
        _int(self.new_tokens, "new_tokens", 1)
        _int(self.repetitions, "repetitions", 1)
        _int(self.seed, "seed", 0)
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt):
            raise TpiError(f"prompt: expected a non-empty text, got {self.prompt!r}")

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(prompt length or 0 for the text prompt, repetition) in run order."""
        lengths = (0,) if self.prompt is not None else self.prompt_lengths
        return [(n, rep) for n in lengths for rep in range(self.repetitions)]


@dataclass(frozen=True)
class Options:
    mode: str = "tpi"
    clock: str = "virtual"
    compute: str = "measured"
    allreduce: str = "star"
    window: int | None = None
    retain_every: int = 0
    ratios: str | tuple[float, ...] = "equal"
    mem_cap: int | None = None  # bytes
    cgroup_root: str | None = None
    timeout_s: float = 60.0
    trace: bool = False
    drop_cache: bool = True

    def __post_init__(self) -> None:
        _choice(self.mode, "mode", MODES)
        _choice(self.clock, "clock", CLOCKS)
        _choice(self.compute, "compute", COMPUTE)
        if self.compute == "free" and self.clock != "virtual":
            raise TpiError("compute: 'free' needs clock: virtual (a wall clock cannot skip compute)")
        _choice(self.allreduce, "allreduce", ALLREDUCE)
        window = self.window
        if isinstance(window, str) and window.strip().lower() in ("none", "null", "off", ""):
            window = None
        if window is not None:
            _int(window, "window", 2)
        # the mode fixes what it names (see the module docstring); results record the options as run
        if self.mode == "galaxy":
            object.__setattr__(self, "allreduce", "ring")
        if self.mode in ("galaxy", "pipeline", "standalone", "offload"):
            window = None
            object.__setattr__(self, "retain_every", 0)
        elif self.mode == "standalone+ms" and window is None:
            window = 2
        object.__setattr__(self, "window", window)
        _int(self.retain_every, "retain_every", 0)
        if self.retain_every and window is None:
            raise TpiError(f"retain_every: {self.retain_every} needs a window (retention is part of the scheduler)")
        ratios = self.ratios
        if isinstance(ratios, (list, tuple)):
            if not ratios:
                raise TpiError("ratios: empty list")
            for i, r in enumerate(ratios):
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
                    raise TpiError(f"ratios[{i}]: must be a number > 0, got {r!r}")
            ratios = tuple(float(r) for r in ratios)
        elif ratios not in ("equal", "speed"):
            raise TpiError(f"ratios: expected equal, speed or a list of numbers, got {ratios!r}")
        object.__setattr__(self, "ratios", ratios)
        if self.mem_cap is not None:
            object.__setattr__(self, "mem_cap", parse_bytes(self.mem_cap, "mem_cap"))
            if self.mem_cap <= 0:
                raise TpiError(f"mem_cap: must be > 0, got {self.mem_cap}")
        if self.cgroup_root is not None and not Path(self.cgroup_root).is_dir():
            raise TpiError(f"cgroup_root: {self.cgroup_root} is not a directory")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise TpiError(f"timeout_s: must be a number > 0, got {t!r}")
        object.__setattr__(self, "timeout_s", float(t))
        for key in ("trace", "drop_cache"):
            if not isinstance(getattr(self, key), bool):
                raise TpiError(f"{key}: expected true or false, got {getattr(self, key)!r}")

    @property
    def single_device(self) -> bool:
        return self.mode in SINGLE_DEVICE_MODES

    @property
    def tensor_parallel(self) -> bool:
        return self.mode in ("tpi", "galaxy")


@dataclass(frozen=True)
class RunConfig:
    """A validated experiment. `doc` is the resolved document (topology inline, overrides applied)."""

    name: str
    source: str
    topology: Topology
    model: ModelSpec
    workload: Workload
    options: Options
    doc: dict

    def __post_init__(self) -> None:
        ratios = self.options.ratios
        if isinstance(ratios, tuple) and len(ratios) != len(self.topology):
            raise TpiError(f"{self.source}: options.ratios: {len(ratios)} values for {len(self.topology)} devices")
        if self.options.single_device and len(self.topology) > 1:  # the first device alone
            from dataclasses import replace

            first = self.topology.devices[0]
            own = {lid: link for lid, link in self.topology.links.items() if first.name in lid.split(">")}
            topo = Topology(devices=(first,), links=own or dict(self.topology.links), paths={},
                            name=self.topology.name)
            object.__setattr__(self, "topology", topo)
            object.__setattr__(self, "options", replace(self.options, ratios="equal"))

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
                         "devices": [asdict(d) for d in topo.devices],
                         "links": {lid: asdict(link) for lid, link in sorted(topo.links.items())}},
            "model": asdict(self.model),
            "workload": {**asdict(self.workload), "prompt_lengths": list(self.workload.prompt_lengths)},
            "options": {**asdict(self.options),
                        "ratios": self.options.ratios if isinstance(self.options.ratios, str)
                        else list(self.options.ratios)},
        }


# ---------------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[str, Any]:
    """'links.latency_ms=5ms' -> ('links.latency_ms', '5ms'); the value is read as YAML (5 -> int,
    [16, 64] -> list, null -> None)."""
    import yaml

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise TpiError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. links.latency_ms=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise TpiError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return key, parsed


def _set(doc: dict, key: str, value: Any) -> None:
    value = copy.deepcopy(value)  # sweep points share their values: a later `model.layers` must not edit them
    parts = key.split(".")
    if parts[0] in ("devices", "links"):
        parts = ["topology"] + parts
    if parts[0] not in SECTIONS:
        raise TpiError(f"--set {key}: unknown section {parts[0]!r} "
                       f"(one of {', '.join(SECTIONS)}, or devices/links for the topology)")
    node: Any = doc
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise TpiError(f"--set {key}: {where}: no such list item")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise TpiError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.lstrip("-").isdigit() or not -len(node) <= int(last) < len(node):
            raise TpiError(f"--set {key}: no such list item")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise TpiError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")


def _read_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise TpiError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TpiError(f"{path}: not valid YAML ({e})") from None


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


def load_run_config(path: str | Path | None, overrides: Sequence[tuple[str, Any]] = (),
                    doc: Mapping | None = None, source: str | None = None,
                    base_dir: str | Path | None = None) -> RunConfig:
    """Read, override, validate. `doc` instead of `path` builds from a mapping (tests, the CLI, the points
    of an experiment: then `source` names it in errors and relative paths start at `base_dir`)."""
    from_file = doc is None
    if from_file:
        path = Path(path)
        raw = _read_yaml(path, "run config")
        source, base = str(path), path.parent
    else:
        raw, source = doc, source or "<run config>"
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(raw, Mapping):
        raise TpiError(f"{source}: expected a mapping at the top level")
    doc = copy.deepcopy(dict(raw))
    try:
        _keys(doc, SECTIONS, "")
        for key, value in overrides:  # a whole new topology first, so overrides can reach into it
            if key == "topology":
                doc["topology"] = value
        overrides = [(k, v) for k, v in overrides if k != "topology"]
        topo = doc.get("topology")
        if topo is None:
            raise TpiError("topology: missing (a preset name like klonet, a path, or a mapping)")
        if isinstance(topo, str):
            tpath = resolve_topology_ref(topo, base)
            loaded = _read_yaml(tpath, "topology file")
            if not isinstance(loaded, Mapping):
                raise TpiError(f"topology: {tpath} does not hold a mapping")
            doc["topology"] = dict(loaded)
            doc["topology"].setdefault("name", tpath.stem)
        elif not isinstance(topo, Mapping):
            raise TpiError(f"topology: expected a preset name, a path or a mapping, got {topo!r}")
        for key, value in overrides:
            _set(doc, key, value)
        _keys(doc, SECTIONS, "")  # an override may have added a section
    except TpiError as e:
        raise TpiError(f"{source}: {e}") from None

    name = doc.get("name", Path(source).stem if from_file else "emulate")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise TpiError(f"{source}: name: expected a plain file name for results/<name>.jsonl, got {name!r}")
    topology = topology_from_dict(doc["topology"], f"{source}: topology")
    model = _section(source, "model", doc.get("model"), ModelSpec)
    workload = _section(source, "workload", doc.get("workload"), Workload)
    options = _section(source, "options", doc.get("options"), Options)
    if model.path is not None and not Path(model.path).expanduser().is_absolute():  # relative to the file
        model = ModelSpec(path=str((base / Path(model.path).expanduser()).resolve()))
    return RunConfig(name=name, source=source, topology=topology, model=model, workload=workload,
                     options=options, doc=doc)


def _section(source: str, where: str, doc: Any, cls):
    from dataclasses import fields

    allowed = [f.name for f in fields(cls)]
    try:
        d = _keys(doc, allowed, where)
    except TpiError as e:
        raise TpiError(f"{source}: {e}") from None
    if where == "model" and not d:
        raise TpiError(f"{source}: model: missing (synth: PRESET or path: DIR)")
    try:
        return cls(**d)
    except TpiError as e:
        raise TpiError(f"{source}: {where}.{e}") from None
