"""The layout of one training run in object storage, shared by pipeline steps and drivers.

```
<run URL>/run.json                    task, seed, resolved config (written once by init_run)
<run URL>/real/<round>-<sha>.npz      real transitions, one immutable shard per round
<run URL>/model/<round>-<sha>.npz     imagined transitions, one shard per round
<run URL>/rounds/<round>/<step>.json  what a step produced: metrics and its output artifacts' URIs
<run URL>/policy.pt, summary.json     published by finalize
```
A round is complete when its ``evaluate`` record exists: evaluate runs last and only after every
other step of its round has finished, so the records of a complete round name a consistent set of
states to continue from. A rerun of an incomplete round overwrites its records and adds no rows
twice, because every manifest is built from the last complete round's manifests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .config import MBPOConfig
from .storage import ObjectStore, StorageError, open_store

RUN_FORMAT = 1
STEPS = ("collect", "fit_ensemble", "imagine", "update_sac", "evaluate")
# Which step's record holds each state a continuation needs.
CHECKPOINT_ARTIFACTS = {
    "collector": "collect", "real_manifest": "collect", "dynamics": "fit_ensemble",
    "model_manifest": "imagine", "rollout": "imagine", "agent": "update_sac", "policy": "update_sac",
}


@dataclass(frozen=True)
class Checkpoint:
    """The end of a complete round: what the next pipeline run imports to continue."""

    round: int
    env_steps: int
    artifacts: dict[str, str]  # state name -> artifact URI


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    """A record's metrics with the stored nulls (non-finite values) read back as NaN."""
    return {k: (math.nan if v is None else v) for k, v in record["metrics"].items()}


class RunStore:
    def __init__(self, run_url: str) -> None:
        self.url = run_url.rstrip("/")
        self.store: ObjectStore = open_store(self.url)

    # -- run.json ------------------------------------------------------------------------------
    def write_info(self, cfg: MBPOConfig, total_steps: int, overrides: list[str]) -> None:
        info = {"format": RUN_FORMAT, "env": cfg.env, "seed": cfg.seed, "total_steps": total_steps,
                "overrides": list(overrides), "config": cfg.to_dict()}
        self.store.put("run.json", json.dumps(info, indent=1).encode())

    def update_info(self, **fields: Any) -> None:
        info = self.read_info()
        if info is None:
            raise StorageError(f"no run at {self.url} (run.json is missing)")
        self.store.put("run.json", json.dumps(info | fields, indent=1).encode())

    def read_info(self) -> dict[str, Any] | None:
        if not self.store.exists("run.json"):
            return None
        info = json.loads(self.store.get("run.json"))
        if info.get("format") != RUN_FORMAT:
            raise StorageError(f"{self.url}/run.json has format {info.get('format')!r}; "
                               f"this code reads format {RUN_FORMAT}")
        return info

    def config(self) -> MBPOConfig:
        info = self.read_info()
        if info is None:
            raise StorageError(f"no run at {self.url} (run.json is missing)")
        return MBPOConfig.from_dict(info["config"])

    # -- round records -------------------------------------------------------------------------
    def write_record(self, round_index: int, step: str, env_steps: int, metrics: dict[str, float],
                     artifacts: dict[str, str]) -> None:
        if step not in STEPS:
            raise ValueError(f"step {step!r}: allowed {', '.join(STEPS)}")
        record = {"round": round_index, "step": step, "env_steps": env_steps,
                  "metrics": {k: _finite(v) for k, v in metrics.items()}, "artifacts": artifacts}
        self.store.put(f"rounds/{round_index:06d}/{step}.json", json.dumps(record).encode())

    def has_record(self, round_index: int, step: str) -> bool:
        return self.store.exists(f"rounds/{round_index:06d}/{step}.json")

    def read_record(self, round_index: int, step: str) -> dict[str, Any]:
        return json.loads(self.store.get(f"rounds/{round_index:06d}/{step}.json"))

    def complete_rounds(self) -> list[int]:
        """Indices of rounds whose evaluate record exists; contiguous from 0 in a healthy run."""
        done = sorted(int(k.split("/")[1]) for k in self.store.list("rounds/")
                      if k.endswith("/evaluate.json"))
        # a gap would mean a round was lost: continue from the last contiguous one
        last = -1
        for r in done:
            if r != last + 1:
                break
            last = r
        return list(range(last + 1))

    def checkpoint(self) -> Checkpoint | None:
        rounds = self.complete_rounds()
        if not rounds:
            return None
        r = rounds[-1]
        records = {step: self.read_record(r, step) for step in set(CHECKPOINT_ARTIFACTS.values())}
        artifacts = {name: records[step]["artifacts"][name]
                     for name, step in CHECKPOINT_ARTIFACTS.items()}
        return Checkpoint(r, int(records["collect"]["env_steps"]), artifacts)

    def round_metrics(self, round_index: int) -> tuple[int, dict[str, float]]:
        """(env_steps, the metrics of all its steps) of one complete round."""
        merged: dict[str, float] = {}
        for step in STEPS:
            merged |= _metrics(self.read_record(round_index, step))
        return int(self.read_record(round_index, "collect")["env_steps"]), merged

    def metrics(self, upto_round: int | None = None) -> list[tuple[int, dict[str, float]]]:
        """(env_steps, merged metrics of all steps) per complete round, in order."""
        return [self.round_metrics(r) for r in self.complete_rounds()
                if upto_round is None or r <= upto_round]

    def curve(self, upto_round: int | None = None) -> list[list[float]]:
        """[env steps, mean, std] per complete round, from the evaluate records alone (one read
        per round rather than five: evaluate and finalize call this every round)."""
        out = []
        for r in self.complete_rounds():
            if upto_round is not None and r > upto_round:
                break
            rec = self.read_record(r, "evaluate")
            m = _metrics(rec)
            out.append([int(rec["env_steps"]), m["eval/return_mean"], m["eval/return_std"]])
        return out
