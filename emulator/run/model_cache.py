"""Model folders for emulation runs, cached across runs under .cache/ (the supervisor's side only).

    resolve_model    an HF checkpoint folder or GGUF file as given, or a synthetic preset written once into
                     .cache/models/<preset>-<layers>-<dtype>-s<seed>-<hash> (a ggml dtype: a GGUF file
                     model.gguf in that folder, tpicore.tools.synth.gguf)
    unique_shards    unique-layer models (model.unique_layers K): per-device shard folders written
                     directly (.cache/models/unique-*); another layer count of the same family is
                     hard-linked (derive_layers); least recently used folders are evicted to stay within
                     a disk budget (make_room)
    prepare          both, plus tensor-parallel shards (.cache/shards/), in a short-lived child process so
                     the supervisor -- and every device forked from it -- stays small

Concurrent runs synthesize once (an flock per folder). Must not start devices or touch results.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

from emulator.config.run_config import ModelSpec, RunConfig
from tpicore.errors import TpiError
from tpicore.tools.predictor import STORED_BYTES
from tpicore.tools.shard import cached_shards
from tpicore.tools.synth.checkpoint import checkpoint_tensors, write_checkpoint
from tpicore.tools.synth.gguf import write_synthetic_gguf
from tpicore.tools.synth.presets import PRESETS, preset_config
from tpicore.tools.synth.unique import NOTE, write_unique_shards
from tpicore.weights.gguf import GGUFCheckpoint, hf_config_dict, is_gguf_path
from tpicore.weights.integrity import file_crc32
from tpicore.weights.manifest import MANIFEST_FILE, manifest_text, refingerprint
from tpicore.weights.quant import is_block_quantized

GGUF_FILE = "model.gguf"  # a synthetic model in a ggml dtype, in its cache folder


def model_cache_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    layers = f"{spec.layers}L" if spec.layers else "all"
    return cache_dir / "models" / f"{spec.synth}-{layers}-{spec.dtype}-s{spec.seed}-{key}"


def resolve_model(spec: ModelSpec, cache_dir: Path, quiet: bool = False) -> str:
    """The checkpoint folder: the given path, or the synthetic preset written once into the cache."""
    if spec.path is not None:
        if is_gguf_path(spec.path):
            if not Path(spec.path).is_file():
                raise TpiError(f"model.path: {spec.path}: GGUF file not found")
            return str(Path(spec.path).absolute())  # by name: a split set's parts are found from it
        if not (Path(spec.path) / "config.json").is_file():
            raise TpiError(f"model.path: {spec.path} is not a checkpoint folder (no config.json) or a .gguf file")
        return str(Path(spec.path).resolve())
    out = model_cache_dir(spec, cache_dir)
    if is_block_quantized(spec.dtype.upper()):  # ggml types live in a GGUF file
        return _synthetic_gguf(spec, out, quiet)
    if (out / "config.json").is_file():  # write_checkpoint renames a complete folder into place
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two experiments started together synthesize once
        if not (out / "config.json").is_file():
            config = preset_config(spec.synth)
            if spec.layers:
                config["num_hidden_layers"] = spec.layers
            if not quiet:
                print(f"model: synthesizing {spec.synth} ({config['num_hidden_layers']} layers, {spec.dtype}) "
                      f"into {out}", file=sys.stderr)
            write_checkpoint(config, out, dtype=spec.dtype, seed=spec.seed, progress=False)
    return str(out)


def model_config_json(model: str) -> dict:
    """The config.json dict of a model folder, or the one a GGUF file's metadata corresponds to."""
    if is_gguf_path(model):
        return hf_config_dict(GGUFCheckpoint(model).cfg)
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)


def _synthetic_gguf(spec: ModelSpec, out: Path, quiet: bool) -> str:
    """A synthetic preset in a ggml dtype: OUT/model.gguf, written once (renamed into place when complete)."""
    path = out / GGUF_FILE
    if path.is_file():
        return str(path)
    out.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            config = preset_config(spec.synth)
            if spec.layers:
                config["num_hidden_layers"] = spec.layers
            if not quiet:
                print(f"model: synthesizing {spec.synth} ({config['num_hidden_layers']} layers, {spec.dtype}) "
                      f"into {path}", file=sys.stderr)
            write_synthetic_gguf(config, path, spec.dtype, spec.seed)
    return str(path)


# Unique-layer models are big even with few layers stored (a 70B-shaped one: 3.4 GB per stored layer +
# the embedding and head); the disk is shared, so folders are evicted, least recently used first, to
# keep this much free and the folders within this budget (bytes; environment variables in GB).
DISK_RESERVE = int(float(os.environ.get("TPI_EMU_DISK_RESERVE_GB", "8")) * 1e9)
UNIQUE_CACHE_BUDGET = int(float(os.environ.get("TPI_EMU_CACHE_GB", "30")) * 1e9)


def _family(spec: ModelSpec, world_size: int, ratios: list[float] | None) -> str:
    """Folders of one family hold the same tensors and differ only in the layer count (the manifest)."""
    doc = {"model": {**spec.model_dump(), "layers": None}, "world_size": world_size, "ratios": ratios}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def unique_cache_dir(spec: ModelSpec, world_size: int, ratios: list[float] | None, cache_dir: Path) -> Path:
    layers = spec.layers or PRESETS[spec.synth]["num_hidden_layers"]
    return cache_dir / "models" / (f"unique-{spec.synth}-{spec.unique_layers}of{layers}-{spec.dtype}-s{spec.seed}"
                                   f"-n{world_size}-{_family(spec, world_size, ratios)}")


def derive_layers(src: Path, out: Path, layers: int, unique: int) -> None:
    """A unique-layer folder for another layer count from one of the same family: the stored tensors are
    the same (K layers + embedding + head), so the shard files are hard-linked and only the manifests
    (config, layer_map, fingerprint) and rank 0's config.json are rewritten. Atomic like the writer."""
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rank_dir in sorted(src.glob("rank-*")):
            dst = tmp / rank_dir.name
            dst.mkdir(parents=True)
            man = json.loads((rank_dir / MANIFEST_FILE).read_text())
            for f in rank_dir.iterdir():
                if f.name not in (MANIFEST_FILE, "config.json"):
                    os.link(f, dst / f.name)
            man["config"] = dict(man["config"], num_hidden_layers=layers)
            man["layer_map"] = [layer % unique for layer in range(layers)]
            man["fingerprint"] = refingerprint(man, str(rank_dir / MANIFEST_FILE))
            man["synthetic"] = dict(man.get("synthetic") or {}, note=NOTE.format(k=unique, l=layers),
                                    derived_from=src.name)  # the shard file's own metadata names src's count
            if (rank_dir / "config.json").exists():
                (dst / "config.json").write_text(json.dumps(man["config"], indent=2) + "\n")
                if man.get("master_files"):  # its CRC32 is checked at every load
                    man["master_files"]["config.json"] = file_crc32(str(dst / "config.json"))
            (dst / MANIFEST_FILE).write_text(manifest_text(man))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unique_config(spec: ModelSpec) -> dict:
    config = preset_config(spec.synth)
    if spec.layers:
        config["num_hidden_layers"] = spec.layers
    return config


def unique_bytes(spec: ModelSpec) -> int:
    """Stored bytes of a unique-layer model (every rank's folder together): K layers + embedding + head."""
    config = dict(_unique_config(spec), num_hidden_layers=spec.unique_layers)
    return int(sum(math.prod(shape) for _, shape in checkpoint_tensors(config)) * STORED_BYTES[spec.dtype])


def _folder_bytes(path: Path) -> int:
    """Disk bytes of a folder, hard-linked files shared among their links."""
    return sum(st.st_size // st.st_nlink for f in path.rglob("*") if f.is_file() for st in [f.stat()])


def make_room(models_root: Path, need: int, keep: Path | None = None, quiet: bool = True) -> None:
    """Delete least recently used unique-layer folders until `need` bytes fit the disk reserve and the
    cache budget; TpiError if they cannot."""
    models_root.mkdir(parents=True, exist_ok=True)
    folders = [p for p in models_root.glob("unique-*") if p.is_dir() and p != keep
               and ".tmp-" not in p.name and ".old-" not in p.name]
    folders.sort(key=lambda p: p.stat().st_mtime)  # least recently used first (touched on every use)
    sizes = {p: _folder_bytes(p) for p in folders}
    while folders and (shutil.disk_usage(models_root).free < need + DISK_RESERVE
                       or sum(sizes.values()) + need > UNIQUE_CACHE_BUDGET):
        victim = folders.pop(0)
        if not quiet:
            print(f"model: evicting {victim.name} ({sizes[victim] / 1e9:.1f} GB) to make room", file=sys.stderr)
        shutil.rmtree(victim, ignore_errors=True)
        sizes.pop(victim)
    free = shutil.disk_usage(models_root).free
    if free < need + DISK_RESERVE:
        raise TpiError(f"{models_root}: not enough free disk for a {need / 1e9:.1f} GB model: {free / 1e9:.1f} GB "
                       f"free, {DISK_RESERVE / 1e9:.0f} GB kept in reserve (TPI_EMU_DISK_RESERVE_GB)")


def unique_shards(spec: ModelSpec, world_size: int, ratios: list[float] | None, cache_dir: Path,
                  quiet: bool = True, write: bool = True) -> list[str]:
    """Per-device shard folders of a unique-layer model for `world_size` devices, written once."""
    out = unique_cache_dir(spec, world_size, ratios, cache_dir)
    dirs = [str(out / f"rank-{r}") for r in range(world_size)]

    def complete() -> bool:
        return all(os.path.isfile(os.path.join(d, "manifest.json")) for d in dirs)

    if not complete():
        if not write:
            raise TpiError(f"{out}: unique-layer shards missing")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{out}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not complete():
                family = [p for p in out.parent.glob(f"unique-{spec.synth}-{spec.unique_layers}of*-*-"
                                                     f"{out.name.rsplit('-', 1)[1]}")
                          if p != out and ".tmp-" not in p.name and (p / "rank-0" / "manifest.json").is_file()
                          and all((p / f"rank-{r}" / "manifest.json").is_file() for r in range(world_size))]
                if family:  # same tensors, another layer count: link, do not write again
                    shutil.rmtree(out, ignore_errors=True)
                    derive_layers(family[0], out, _unique_config(spec)["num_hidden_layers"], spec.unique_layers)
                else:
                    make_room(out.parent, unique_bytes(spec), keep=out, quiet=quiet)
                    if not quiet:
                        print(f"model: writing {spec.synth} with {spec.unique_layers} unique layers for {world_size} "
                              f"device{'s' * (world_size != 1)} into {out}", file=sys.stderr)
                    write_unique_shards(_unique_config(spec), str(out), world_size, spec.unique_layers,
                                        dtype=spec.dtype, seed=spec.seed, ratios=ratios, force=out.exists(),
                                        quiet=quiet)
    os.utime(out)  # least recently used goes first
    return dirs


def prepare(cfg: RunConfig, cache_dir: Path, quiet: bool) -> tuple[str, list[str]]:
    """The model folder (its config.json) and each rank's folder: tensor parallel ranks get their shard
    folder; pipeline stages and one-device modes read the whole model (a checkpoint folder, or the
    one-device shard folder of a unique-layer model). Synthesis and sharding run in a child process
    (the writers' buffers never enter the supervisor, whose memory every device inherits)."""
    spec, n, tp = cfg.model, cfg.world_size, cfg.options.tensor_parallel
    world = n if tp else 1  # what the weights are split for
    ratios = cfg.ratios() if tp else None
    k = cfg.options.private_layers  # tpicore --private-layers K: in the shard split (and its cache key)
    if k and (spec.unique or not tp):
        raise TpiError(f"{cfg.source}: options.private_layers: needs a tensor-parallel mode and a model without "
                       "unique_layers")

    def work() -> None:
        if spec.unique:
            unique_shards(spec, world, ratios, cache_dir, quiet)
            return
        model = resolve_model(spec, cache_dir, quiet)
        if tp:
            cached_shards(model, n, ratios, cache_root=str(cache_dir / "shards"), quiet=quiet, private_layers=k)

    try:
        _in_child(work)
    except TpiError as e:
        what = spec.synth or spec.path
        raise TpiError(f"{cfg.source}: model {what} on {n} device{'s' * (n != 1)}: {e}") from None
    if spec.unique:
        folders = unique_shards(spec, world, ratios, cache_dir, write=False)
        return folders[0], folders if tp else [folders[0]] * n
    model = resolve_model(spec, cache_dir, quiet=True)
    if tp:
        return model, cached_shards(model, n, ratios, cache_root=str(cache_dir / "shards"), quiet=True,
                                    private_layers=k)
    return model, [model] * n


def _in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child; its TpiError comes back as ours."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            fn()
        except TpiError as e:
            os.write(w, str(e).encode())
            code = 2
        except BaseException:  # noqa: BLE001 - report anything, never unwind into the parent's code
            os.write(w, traceback.format_exc().encode())
            code = 3
        os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:
        _kill_pid(pid)
        raise
    finally:
        os.close(r)
    if status != 0:
        msg = b"".join(chunks).decode(errors="replace").strip()
        raise TpiError(msg or f"model preparation failed (wait status {status})")


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
