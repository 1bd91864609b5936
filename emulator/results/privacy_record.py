"""One line of the privacy experiment (results/privacy.jsonl): prompt recovery and latency for one K.

Layer: results (imports emulator.results.provenance only). Owns the record's fields and its JSON form; written by
emulator/run/privacy.py through emulator.results.record.append_record, read back by read_records (which
dispatches on "runner": "privacy") for the figure emulator/figures/privacy.py. Must not run anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emulator.results.provenance import Provenance

Json = dict[str, Any]


@dataclass(frozen=True)
class PrivacyRecord:
    """What an honest-but-curious worker recovers of held-out prompts when the first `private_layers`
    layers run on the master alone, and what K costs in latency:

        experiment, runner ("privacy"), sweep (one id per invocation), time, error, wall_s
        point            {private_layers: K} (0 = today's split: the worker receives the embedding rows)
        config           the experiment file as run (model, attack and latency settings)
        recovery         attack -> fraction of held-out prompt tokens recovered exactly
                         (nearest: nearest embedding row; linear: ridge map to embedding space, then nearest;
                         mlp: the linear map plus a one-hidden-layer MLP on its residual, then nearest;
                         search: re-run the first K layers on candidate tokens with the public weights)
        ttft_s, token_latency_s   medians over the repetitions (None when not measured)
    """

    experiment: str
    sweep: str
    private_layers: int
    config: Json
    recovery: dict[str, float]
    ttft_s: float | None
    token_latency_s: float | None
    error: str | None
    wall_s: float
    time: str
    provenance: Provenance | None = None  # commit, dirty flag, host load; None on lines written before it

    @property
    def point(self) -> Json:
        return {"private_layers": self.private_layers}

    @property
    def description(self) -> str:
        return self.config["description"]

    def to_json(self) -> Json:
        return {"experiment": self.experiment, "runner": "privacy", "sweep": self.sweep, "point": self.point,
                "config": self.config, "recovery": dict(self.recovery),
                "ttft_s": self.ttft_s, "token_latency_s": self.token_latency_s, "error": self.error,
                "wall_s": self.wall_s, "time": self.time,
                **({"provenance": self.provenance.to_json()} if self.provenance else {})}

    @classmethod
    def from_json(cls, d: Json) -> "PrivacyRecord":
        return cls(experiment=d["experiment"], sweep=d["sweep"], private_layers=int(d["point"]["private_layers"]),
                   config=d["config"], recovery={k: float(v) for k, v in d["recovery"].items()},
                   ttft_s=d["ttft_s"], token_latency_s=d["token_latency_s"], error=d["error"],
                   wall_s=d["wall_s"], time=d["time"],
                   provenance=Provenance.from_json(d["provenance"]) if d.get("provenance") is not None else None)
