"""Schedules: one-shot (score, mask, fine-tune) and iterative rounds with rewinding.

Iterative (lottery ticket, Frankle & Carbin 2019; rewinding, Frankle et al. 2020): round
``r = 1..R`` prunes to sparsity ``1 − (1 − S)^{r/R}`` (the same fraction of the remaining
weights each round), then resets the surviving weights according to ``rewind``:

- ``rewind_lt``: to the early-training weights (the snapshot ``certiprune train`` saves after
  ``--rewind-epoch``), keeping the mask;
- ``lt``: to the initial weights;
- ``pt``: no reset (keep the trained weights);

and retrains with the method's fine-tuning objective. Every round is checkpointed
(``round_<r>.pt`` with masks and weights, ``round_<r>.json`` with its summary) and a rerun skips
finished rounds; the fine-tuning inside a round resumes per epoch.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.methods import Method, PruneContext
from pruning.sparsity import (
    apply_masks, check_sparsity, masks_from_state_dict, masks_of, overall_sparsity,
    prune_by_scores, rewind, sparsity_report,
)
from pruning.train import TrainConfig, train

REWINDS = ("rewind_lt", "lt", "pt")
SCHEDULES = ("one-shot", "iterative")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "one-shot"  # "one-shot" or "iterative"
    rounds: int = 1  # iterative only
    rewind: str = "rewind_lt"  # iterative only: "rewind_lt", "lt" or "pt"
    scope: str = "global"  # "global" or "layer"

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise PruningError(
                f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.rewind not in REWINDS:
            raise PruningError(
                f"unknown rewind {self.rewind!r}; choose one of {', '.join(REWINDS)}")
        if self.rounds < 1:
            raise PruningError(f"rounds must be ≥ 1, got {self.rounds}")


def round_targets(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each round: ``1 − (1 − S)^{r/R}``, the last one exactly ``S``."""
    return [1 - (1 - sparsity) ** (r / rounds) for r in range(1, rounds)] + [sparsity]


Evaluator = Callable[[nn.Module], dict]


def _summary(round_index: int, target: float, model: nn.Module, evaluate: Evaluator | None,
             seconds: float, history) -> dict:
    report = sparsity_report(model)
    summary = {
        "round": round_index,
        "target_sparsity": target,
        "sparsity": overall_sparsity(report),
        "layers": {r.name: {"shape": list(r.shape), "n_weights": r.n_weights,
                            "n_zero": r.n_zero, "sparsity": r.sparsity} for r in report},
        "finetune": [dataclasses.asdict(h) for h in history],
        "seconds": seconds,
    }
    if evaluate is not None:
        summary.update(evaluate(model))
    return summary


def _load_round(model: nn.Module, path: Path) -> None:
    state = torch.load(path, weights_only=False)["model"]
    already = masks_of(model)
    masks = {name: mask for name, mask in masks_from_state_dict(state).items()
             if not torch.equal(mask, already.get(name, mask))}
    apply_masks(model, masks)
    model.load_state_dict(state)


def run_schedule(
    model: nn.Module,
    method: Method,
    sparsity: float,
    schedule: ScheduleConfig,
    ctx: PruneContext,
    finetune: TrainConfig,
    workdir: Path,
    *,
    early_state: tuple[dict, dict] | None = None,
    evaluate: Evaluator | None = None,
    eval_kwargs: dict | None = None,
) -> list[dict]:
    """Prune ``model`` in place to ``sparsity`` under ``schedule``; returns one summary per round.

    early_state: ``(weights, biases)`` per layer name (``sparsity.layer_weights``) to rewind to;
    required by iterative schedules with ``rewind`` "rewind_lt" or "lt". evaluate(model) -> dict
    of metrics merged into each round's summary; eval_kwargs go to ``train`` (per-epoch
    evaluation). Mask state lives in ``model`` via ``torch.nn.utils.prune``.
    """
    check_sparsity(sparsity)
    rounds = schedule.rounds if schedule.kind == "iterative" else 1
    needs_rewind = schedule.kind == "iterative" and schedule.rewind != "pt"
    if needs_rewind and early_state is None:
        raise PruningError(f"rewind {schedule.rewind!r} needs the early (or initial) weights")
    workdir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for index, target in enumerate(round_targets(sparsity, rounds), start=1):
        round_file = workdir / f"round_{index}.pt"
        summary_file = workdir / f"round_{index}.json"
        if round_file.is_file() and summary_file.is_file():
            _load_round(model, round_file)
            summaries.append(json.loads(summary_file.read_text()))
            continue
        start = time.perf_counter()
        scores = method.scores(model, target, schedule.scope, ctx)
        prune_by_scores(model, scores, target, schedule.scope)
        if needs_rewind:
            rewind(model, *early_state)
        history = train(
            model, method.finetune_objective(model, ctx), ctx.data, finetune,
            checkpoint=workdir / f"round_{index}.train.pt", progress=ctx.progress,
            desc=f"finetune r{index}", **(eval_kwargs or {}),
        )
        summary = _summary(index, target, model, evaluate, time.perf_counter() - start, history)
        torch.save({"model": model.state_dict()}, round_file)
        summary_file.write_text(json.dumps(summary, indent=2))
        (workdir / f"round_{index}.train.pt").unlink(missing_ok=True)
        summaries.append(summary)
    return summaries
