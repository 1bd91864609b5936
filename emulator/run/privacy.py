"""The privacy experiment (configs/experiments/privacy.yaml -> results/privacy.jsonl): how well an
honest-but-curious worker reconstructs the prompt from what it receives, against `--private-layers K`,
and what each K costs in latency.

Layer: run (imports emulator.results and tpicore). Owns the attack, its data and the latency runs of this
experiment; `reproduce` hands it files with `runner: privacy` (emulator.run.experiments). Must not draw.

What a worker receives at step one is the master's broadcast x_K [T, D]: the hidden states after the K
private layers (tpicore.dist.tensor_parallel.Master.step; x_0 = the embedding rows). The attacker knows
the public weights, so it computes x_K of token sequences of its own choosing with the same Llama math
(tpicore.model.llama) and fits inversions on them; it is scored on held-out prompts it never saw:
  nearest  cosine-nearest row of the embedding table to x_K (exact at K = 0)
  linear   ridge regression from x_K (RMS-normalised) to the token's unit embedding row, then nearest row
  mlp      the linear map plus a one-hidden-layer ReLU MLP trained (Adam) on its residual, the epoch
           picked on a tenth of the attacker's own data held back, then nearest row
  search   position by position, re-run layers 0..K-1 on the tokens recovered so far plus a candidate
           (candidates in the linear attack's order, at most `search_max`) and keep the candidate whose
           x_K matches the received one (relative distance < 1e-3); scored on `search_prompts` prompts
Latency: one emulator run per K (the file's `latency` section is its run config: topology, workload,
options; the proxy model and `options.private_layers: K` are put in), medians over its repetitions.

    python -m emulator.run.privacy [configs/experiments/privacy.yaml] [--smoke] [--results DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from emulator.config.run_config import load_run_config
from emulator.results.privacy_record import PrivacyRecord
from emulator.results.provenance import utc_now
from emulator.results.record import append_record
from emulator.run.launcher import Run
from tpicore.dist.tensor_parallel import set_blas_threads
from tpicore.errors import TpiError
from tpicore.model import llama as M
from tpicore.model.tensors import checkpoint_tensors, layer_name
from tpicore.tools.synth.checkpoint import write_checkpoint
from tpicore.tools.synth.presets import llama_config
from tpicore.weights.store import TensorStore

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "privacy.yaml"
FIRST_TOKEN = 3  # ids below are the synthetic tokenizer's specials


@dataclass(frozen=True)
class PrivacyConfig:
    """The experiment file (every key required; `smoke` replaces some of them)."""

    name: str
    description: str
    model: dict  # hidden, layers, heads, kv_heads, ffn, vocab, seed
    private_layers: tuple[int, ...]
    seq_len: int  # tokens per training / held-out sequence
    train_sequences: int
    test_sequences: int
    ridge: float
    mlp_hidden: int
    mlp_epochs: int
    search_prompts: int  # held-out prompts the search attack is scored on (it is slow: K layers per candidate)
    search_max: int  # candidates tried per position
    devices: int
    latency: dict  # an emulator run config without its model (the proxy is put in)
    seed: int
    doc: dict

    KEYS = ("name", "runner", "description", "estimate_s", "model", "private_layers", "attack", "latency", "seed",
            "smoke")


def load_config(path: str | Path, smoke: bool = False) -> PrivacyConfig:
    """Read and check the experiment file; errors name the file and key."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TpiError(f"{path}: cannot read the experiment file ({e})") from None
    if not isinstance(doc, dict):
        raise TpiError(f"{path}: expected a mapping at the top level")
    unknown = set(doc) - set(PrivacyConfig.KEYS)
    if unknown:
        raise TpiError(f"{path}: unknown key(s) {sorted(unknown)}")
    if doc.get("runner") != "privacy":
        raise TpiError(f"{path}: runner: expected privacy")
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items() if k != "smoke"}
    if smoke:
        for key, value in (doc.get("smoke") or {}).items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    try:
        attack, lat = merged["attack"], dict(merged["latency"])
        ks = tuple(int(k) for k in merged["private_layers"])
        cfg = PrivacyConfig(
            name=str(merged["name"]), description=str(merged["description"]), model=dict(merged["model"]),
            private_layers=ks, seq_len=int(attack["seq_len"]), train_sequences=int(attack["train_sequences"]),
            test_sequences=int(attack["test_sequences"]), ridge=float(attack["ridge"]),
            mlp_hidden=int(attack["mlp_hidden"]), mlp_epochs=int(attack["mlp_epochs"]),
            search_prompts=int(attack["search_prompts"]), search_max=int(attack["search_max"]),
            devices=int(lat.pop("devices")), latency=lat, seed=int(merged["seed"]), doc=merged)
    except KeyError as e:
        raise TpiError(f"{path}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise TpiError(f"{path}: {e}") from None
    layers = int(cfg.model["layers"])
    if not ks or any(not 0 <= k <= layers for k in ks):
        raise TpiError(f"{path}: private_layers: expected values 0..{layers}, got {list(ks)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# What the worker receives, for sequences of the attacker's choosing


def model_config(cfg: PrivacyConfig) -> dict:
    m = cfg.model
    return llama_config(hidden=int(m["hidden"]), layers=int(m["layers"]), heads=int(m["heads"]),
                        kv_heads=int(m["kv_heads"]), ffn=int(m["ffn"]), vocab=int(m["vocab"]), max_pos=512)


def layer_weights(store: TensorStore, weights: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each layer's weights by leaf name (what tpicore.model.llama's blocks take)."""
    return [{name[len(layer_name(i, "")):]: w for name, w in weights.items() if name.startswith(layer_name(i, ""))}
            for i in range(store.cfg.num_hidden_layers)]


def hidden_states(store: TensorStore, weights: dict[str, np.ndarray], seqs: np.ndarray, ks: tuple[int, ...]
                  ) -> dict[int, np.ndarray]:
    """x_K of every token of `seqs` [S, T] for each K in ks: {K: [S*T, D]} (x_0 = embedding rows)."""
    cfg = store.cfg
    layers = layer_weights(store, weights)
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for seq in seqs:
        x = M.embed(seq, weights["model.embed_tokens.weight"])  # [T] -> [T, D]
        for i in range(max(ks) + 1):
            if i in out:
                out[i].append(x)
            if i < cfg.num_hidden_layers:
                kv = M.KVCache(cfg.num_key_value_heads, len(seq), cfg.head_dim)
                x = M.block(x, layers[i], cfg, kv, 0, M.identity)  # [T, D] -> [T, D]
    return {k: np.concatenate(v) for k, v in out.items()}  # [S*T, D]


# ---------------------------------------------------------------------------------------------
# The attacks


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def nearest(pred: np.ndarray, table_unit: np.ndarray) -> np.ndarray:
    """Token ids of the cosine-nearest embedding rows: [N, D] -> [N]."""
    return np.argmax(unit_rows(pred) @ table_unit.T, axis=1)  # [N, D] @ [D, V] -> [N, V] -> [N]


def features(x: np.ndarray) -> np.ndarray:
    """RMS-normalised hidden states plus a bias column: [N, D] -> [N, D+1]."""
    x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
    return np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)


def fit_linear(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression weights W [D+1, D] with features(x) @ W ~ y."""
    f = features(x).astype(np.float64)
    a = f.T @ f + ridge * len(f) * np.eye(f.shape[1])
    return np.linalg.solve(a, f.T @ y).astype(np.float32)


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, rng: np.random.Generator,
            score=None, lr: float = 1e-3, batch: int = 256) -> list[np.ndarray]:
    """A one-hidden-layer ReLU MLP from features(x) to y (mean squared error), trained by Adam. Used on
    the ridge map's residual with its output layer starting at zero, so it starts as the linear attack;
    `score(params)` (higher is better): the parameters of the best epoch are kept (epoch 0 included)."""
    f = features(x)
    d_in, d_out = f.shape[1], y.shape[1]
    params = [rng.normal(0, d_in ** -0.5, (d_in, hidden)).astype(np.float32), np.zeros(hidden, np.float32),
              np.zeros((hidden, d_out), np.float32), np.zeros(d_out, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    step = 0
    best = (score(params) if score else 0.0, [p.copy() for p in params])
    for _ in range(epochs):
        order = rng.permutation(len(f))
        for lo in range(0, len(f), batch):
            idx = order[lo: lo + batch]
            xb, yb = f[idx], y[idx]
            w1, b1, w2, b2 = params
            h = np.maximum(xb @ w1 + b1, 0)  # [B, D+1] -> [B, H]
            err = (h @ w2 + b2 - yb) * (2.0 / len(idx))  # [B, D]
            dh = (err @ w2.T) * (h > 0)  # [B, H]
            grads = [xb.T @ dh, dh.sum(0), h.T @ err, err.sum(0)]
            step += 1
            for p, g, mi, vi in zip(params, grads, m, v):
                mi *= 0.9
                mi += 0.1 * g
                vi *= 0.999
                vi += 0.001 * g * g
                p -= lr * (mi / (1 - 0.9 ** step)) / (np.sqrt(vi / (1 - 0.999 ** step)) + 1e-8)
        if score is not None:
            s = score(params)
            if s > best[0]:
                best = (s, [p.copy() for p in params])
    return best[1] if score is not None else params


def mlp_predict(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = params
    return np.maximum(features(x) @ w1 + b1, 0) @ w2 + b2  # [N, D+1] -> [N, H] -> [N, D]


def search(layers: list[dict[str, np.ndarray]], store: TensorStore, table: np.ndarray, k: int,
           received: np.ndarray, order: np.ndarray, max_candidates: int) -> np.ndarray:
    """Token ids of one prompt from its received x_K [T, D]: at each position the first candidate (in the
    order `order` [T, V] gives) whose x_K, computed on the ids recovered so far, matches (rel. 1e-3)."""
    cfg = store.cfg
    T = len(received)
    caches = [M.KVCache(cfg.num_key_value_heads, T, cfg.head_dim) for _ in range(k)]

    def x_k(token: int, pos: int) -> np.ndarray:  # one token through layers 0..K-1 on the cached prefix
        x = M.embed(np.array([token]), table)  # [1] -> [1, D]
        for i in range(k):
            x = M.block(x, layers[i], cfg, caches[i], pos, M.identity)  # [1, D]; writes slot pos only
        return x[0]

    out = np.empty(T, dtype=np.int64)
    for t in range(T):
        scale = float(np.linalg.norm(received[t])) or 1.0
        best, best_d = int(order[t][0]), np.inf
        for cand in order[t][:max_candidates]:
            d = float(np.linalg.norm(x_k(int(cand), t) - received[t])) / scale
            if d < best_d:
                best, best_d = int(cand), d
            if d < 1e-3:
                break
        out[t] = best
        x_k(best, t)  # the chosen token's keys and values stay in the caches' slot t
    return out


def recovery(cfg: PrivacyConfig, train_x: np.ndarray, train_ids: np.ndarray, test_x: np.ndarray,
             test_ids: np.ndarray, table: np.ndarray, rng: np.random.Generator,
             store: TensorStore, layers: list[dict[str, np.ndarray]], k: int) -> dict[str, float]:
    """Fraction of held-out tokens each attack recovers exactly."""
    table_unit = unit_rows(table)
    target = table_unit[train_ids]  # [N, D]: the token's unit embedding row
    lin = fit_linear(train_x, target, cfg.ridge)
    n_fit = len(train_x) * 9 // 10  # the attacker keeps a tenth of its own data to pick the MLP's epoch
    fx, vx, v_ids = train_x[:n_fit], train_x[n_fit:], train_ids[n_fit:]
    v_lin = features(vx) @ lin

    def score(params: list[np.ndarray]) -> float:
        return float(np.mean(nearest(v_lin + mlp_predict(params, vx), table_unit) == v_ids))

    mlp = fit_mlp(fx, target[:n_fit] - features(fx) @ lin, cfg.mlp_hidden, cfg.mlp_epochs, rng, score)  # residual
    linear_pred = features(test_x) @ lin  # [N, D]
    T = cfg.seq_len
    n = min(cfg.search_prompts, len(test_x) // T)
    order = np.argsort(-(unit_rows(linear_pred[:n * T]) @ table_unit.T), axis=1)  # [n*T, V]: best first
    found = [search(layers, store, table, k, test_x[p * T:(p + 1) * T], order[p * T:(p + 1) * T], cfg.search_max)
             for p in range(n)]
    return {"nearest": float(np.mean(nearest(test_x, table_unit) == test_ids)),
            "linear": float(np.mean(nearest(linear_pred, table_unit) == test_ids)),
            "mlp": float(np.mean(nearest(linear_pred + mlp_predict(mlp, test_x), table_unit) == test_ids)),
            "search": float(np.mean(np.concatenate(found) == test_ids[:n * T]))}


# ---------------------------------------------------------------------------------------------
# Latency


def latency(cfg: PrivacyConfig, model_dir: str, k: int, work: Path) -> tuple[float, float]:
    """Median TTFT and per-token latency (s) of one emulator run (emulator.run.launcher.Run) of the proxy
    model with `options.private_layers: K`: the `latency` section of the file is its run config."""
    doc = {**cfg.latency, "model": {"path": model_dir}}
    run_cfg = load_run_config(None, [("devices.count", cfg.devices), ("options.private_layers", k),
                                     ("name", cfg.name)], doc=doc, source=f"{cfg.name}: latency (K={k})",
                              base_dir=ROOT)
    res = Run(run_cfg, results_dir=work / "emulator", cache_dir=work / "cache", progress=False).run()
    failed = [r.error for r in res.records if r.error] or ([] if res.exit_code == 0 and res.records else
                                                            [f"emulator run exit code {res.exit_code}"])
    if failed:
        raise TpiError(f"latency at K={k}: {failed[0]}")
    return (statistics.median(r.ttft_s for r in res.records),
            statistics.median(r.token_latency_s for r in res.records))


def run(cfg: PrivacyConfig, results: Path, quiet: bool = False) -> list[PrivacyRecord]:
    """Every K of the file: one line each, appended to results/<name>.jsonl."""
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    set_blas_threads(1)  # many small GEMMs: threads cost more than they give on a shared host
    sweep = uuid.uuid4().hex[:12]
    rng = np.random.default_rng(cfg.seed)
    vocab = int(cfg.model["vocab"])
    config_doc = {**cfg.doc, "weights": "synthetic (tpi synth init, seed %d): random, not pretrained" % int(
        cfg.model.get("seed", 0))}
    records = []
    with tempfile.TemporaryDirectory(prefix="tpi-privacy-") as tmp:
        model_dir = str(Path(tmp) / "model")
        write_checkpoint(model_config(cfg), model_dir, seed=int(cfg.model.get("seed", 0)), progress=False)
        store = TensorStore.from_model_dir(model_dir)
        weights = {name: np.array(store.load(name)) for name, _ in checkpoint_tensors(store.cfg)}
        table = weights["model.embed_tokens.weight"]
        train = rng.integers(FIRST_TOKEN, vocab, (cfg.train_sequences, cfg.seq_len))  # the attacker's own data
        test = rng.integers(FIRST_TOKEN, vocab, (cfg.test_sequences, cfg.seq_len))  # held-out prompts
        say(f"{cfg.name}: hidden states of {len(train) + len(test)} sequences at K = {list(cfg.private_layers)}")
        train_x = hidden_states(store, weights, train, cfg.private_layers)
        test_x = hidden_states(store, weights, test, cfg.private_layers)
        for k in cfg.private_layers:
            t0 = time.monotonic()
            error = None
            rec: dict[str, float] = {}
            ttft = tok = None
            try:
                rec = recovery(cfg, train_x[k], train.reshape(-1), test_x[k], test.reshape(-1), table, rng,
                               store, layer_weights(store, weights), k)
                ttft, tok = latency(cfg, model_dir, k, Path(tmp))
            except TpiError as e:
                error = str(e)
            r = PrivacyRecord(experiment=cfg.name, sweep=sweep, private_layers=k, config=config_doc, recovery=rec,
                              ttft_s=ttft, token_latency_s=tok, error=error, wall_s=time.monotonic() - t0,
                              time=utc_now())
            append_record(results / f"{cfg.name}.jsonl", r)
            records.append(r)
            say(f"{cfg.name}: K={k}: " + ", ".join(f"{a} {v:.1%}" for a, v in rec.items())
                + (f"; TTFT {ttft * 1e3:.1f} ms, token {tok * 1e3:.1f} ms" if ttft is not None else f"; {error}"))
    return records


def run_config(path: str | Path | None = None, results_dir: str | Path | None = None, smoke: bool = False,
               quiet: bool = False) -> int:
    """The entry `reproduce` calls for `runner: privacy`. Exit code: 0 done, 1 a point failed, 2 bad config."""
    try:
        cfg = load_config(path if path is not None else DEFAULT_CONFIG, smoke)
    except TpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = run(cfg, Path(results_dir) if results_dir is not None else ROOT / "results", quiet)
    return 1 if any(r.error for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulator.run.privacy", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.add_argument("--smoke", action="store_true", help="the file's smoke settings (seconds)")
    p.add_argument("--results", default=str(ROOT / "results"), help="results folder (default results/)")
    a = p.parse_args(argv)
    return run_config(a.config, a.results, a.smoke)


if __name__ == "__main__":
    sys.exit(main())
