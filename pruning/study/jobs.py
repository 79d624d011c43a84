"""What a study is made of, and where each piece lives on disk: shared by the pipeline (which
writes the files) and the report (which reads them), so neither imports the other.

- a *base*: a dense model pre-trained per (regime, seed): ``dense``, or ``dense-nrs`` /
  ``dense-slim`` for methods whose loss term is on from pre-training (``Method.regulariser``);
- a *track*: one method's ladder on its base, rounds 1..R (round ``r`` prunes from round
  ``r − 1``), or a base's *control* (``control``, ``control-nrs``, ``control-slim``: no
  pruning, the same retraining per round);
- a *model job*: one evaluated model, ``(regime, seed, track, round)``; round 0 is the base.

Layout under ``<out>/<name>/``::

    <regime>/seed<s>/<base>/             init.pt, rewind.pt, model.pt, train.json
    <regime>/seed<s>/<track>/rounds/     round_<r>.pt, round_<r>.json (pruning.schedule)
    <regime>/seed<s>/<track or base>/r<r>/   metrics.json, model.onnx, export.json,
                                         verify/img<i>.json (+ .jsonl stats records)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

BASES = {None: "dense", "nrs": "dense-nrs", "slim": "dense-slim"}
CONTROLS = {"dense": "control", "dense-nrs": "control-nrs", "dense-slim": "control-slim"}


def base_of(method: str) -> str:
    """The dense model a method (or control) prunes / fine-tunes."""
    if method in BASES.values():
        return method
    from pruning.methods import get_method

    return BASES[get_method(method).regulariser]


def is_base(method: str) -> bool:
    return method in BASES.values()


def is_control(method: str) -> bool:
    return method in CONTROLS.values()


@dataclasses.dataclass(frozen=True, order=True)
class ModelJob:
    """One evaluated model: ``method`` is a base (round 0), a pruning method or a control."""

    regime: str
    seed: int
    method: str
    round: int = 0

    @property
    def track_dir(self) -> str:
        return f"{self.regime}/seed{self.seed}/{self.method}"

    @property
    def key(self) -> str:
        return f"{self.track_dir}/r{self.round}"


class Layout:
    """Paths of a study rooted at ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def base_dir(self, regime: str, seed: int, base: str) -> Path:
        return self.root / regime / f"seed{seed}" / base

    def rounds_dir(self, job: ModelJob) -> Path:
        return self.root / job.track_dir / "rounds"

    def eval_dir(self, job: ModelJob) -> Path:
        return self.root / job.track_dir / f"r{job.round}"

    def checkpoint(self, job: ModelJob) -> Path:
        """The model file of a job: the base's model.pt or the round's checkpoint."""
        if job.round == 0:
            return self.base_dir(job.regime, job.seed, job.method) / "model.pt"
        return self.rounds_dir(job) / f"round_{job.round}.pt"

    def verdict(self, job: ModelJob, image: int) -> Path:
        return self.eval_dir(job) / "verify" / f"img{image}.json"
