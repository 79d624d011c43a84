"""Pruning methods, one file per family; each is named here once.

A method turns a model (and, for data-driven methods, a ``PruneContext``) into importance
scores, larger = keep:

- unstructured (``Method.structured`` False): one tensor per prunable weight, shaped like it;
  ``pruning.sparsity.prune_by_scores`` masks the lowest at an exact weight sparsity;
- structured (``Method.structured`` True): one ``(n_units,)`` tensor per hidden prunable layer
  (output channels / neurons; never the classifier); ``methods.structured.prune_channels``
  removes exactly ``round(fraction · n_units)`` units per scored layer.

Both end as ``torch.nn.utils.prune`` masks. A method also says which objective fine-tunes the
pruned model and which schedule it runs under by default (``imp`` is magnitude scores under the
iterative schedule with rewinding).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from pruning.data import ImageData
from pruning.errors import PruningError
from pruning.objectives import AttackConfig, Objective
from pruning.sparsity import Scores
from pruning.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class PruneContext:
    """What data-driven methods need besides the model.

    ``objective`` is the training regime's loss (standard or PGD); ``attack.eps`` is the radius
    of the stability loss's input ball; ``score_training`` configures HYDRA-style score
    learning (and slim's sparsity training); ``stability_weight`` weighs the ReLU-stability loss
    (see ``methods.stability``); ``score_batches`` is how many mini-batches snip / taylor
    accumulate gradients over.
    """

    data: ImageData
    objective: Objective
    attack: AttackConfig
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    score_training: TrainConfig = TrainConfig(epochs=2, lr=1e-3)
    stability_weight: float = 0.5
    score_batches: int | None = None  # snip / taylor: None = the method's default
    slim_penalty: float = 1e-4  # λ of slim's penalty λ·mean|γ| (the paper's slim_weight)
    seed: int = 0
    layers: str = "all"  # layer scope: "all" prunable layers or only the "conv" ones
    progress: bool = False


ScoreFn = Callable[[nn.Module, float, str, PruneContext], Scores]
ObjectiveFn = Callable[[nn.Module, PruneContext], Objective]


def regime_objective(model: nn.Module, ctx: PruneContext) -> Objective:
    """Fine-tune with the training regime's own loss."""
    return ctx.objective


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    scores: ScoreFn  # (model, sparsity, scope, ctx) -> scores
    finetune_objective: ObjectiveFn = regime_objective
    schedule: str = "one-shot"  # default schedule: "one-shot" or "iterative"
    structured: bool = False  # scores are per output unit; sparsity is a channel fraction
    # A loss term that is on from dense pre-training (the paper's rs_reg / slim_weight):
    # "nrs" or "slim"; the study pre-trains a separate dense model with it for this method.
    regulariser: str | None = None
    threshold: str | None = None  # "layer" / "global" fixed by the method; None: the schedule's


def _methods() -> dict[str, Method]:
    from pruning.methods import gradient, hydra, nrs, stability, structured, unstructured

    return {
        "random": Method("random", unstructured.random_scores),
        "magnitude": Method("magnitude", unstructured.magnitude_scores),
        "imp": Method("imp", unstructured.magnitude_scores, schedule="iterative"),
        # The paper's unstructured stability method: IMP with the NRS loss, on from dense
        # pre-training and in every retraining round (configs/*_l1unstruct_nrs.yml).
        "imp-nrs": Method("imp-nrs", unstructured.magnitude_scores,
                          finetune_objective=nrs.nrs_objective, schedule="iterative",
                          regulariser="nrs"),
        "hydra": Method("hydra", hydra.hydra_scores, threshold="layer"),
        "stability": Method("stability", stability.stability_scores,
                            finetune_objective=stability.stability_objective),
        "snip": Method("snip", gradient.snip_scores),
        "taylor": Method("taylor", gradient.taylor_scores),
        "slim": Method("slim", structured.slim_scores,
                       finetune_objective=structured.slim_objective, structured=True,
                       regulariser="slim"),
        # per layer, as the paper's prune.ln_structured on each conv
        "l1-channel": Method("l1-channel", structured.l1_channel_scores, structured=True,
                             threshold="layer"),
        "refill": Method("refill", structured.refill_scores, structured=True),
        "nrs": Method("nrs", nrs.nrs_scores, finetune_objective=nrs.nrs_objective,
                      structured=True, regulariser="nrs"),
        # Controls: prune nothing, fine-tune round by round exactly as a pruned model is (a
        # study's dense control for the extra epochs; with a regulariser for its dense model).
        "control": Method("control", unstructured.no_scores, schedule="iterative"),
        "control-nrs": Method("control-nrs", unstructured.no_scores,
                              finetune_objective=nrs.nrs_objective, schedule="iterative",
                              regulariser="nrs"),
        "control-slim": Method("control-slim", unstructured.no_scores,
                               finetune_objective=structured.slim_objective,
                               schedule="iterative", regulariser="slim"),
    }


METHOD_NAMES = tuple(_methods())


def get_method(name: str) -> Method:
    methods = _methods()
    if name not in methods:
        raise PruningError(
            f"unknown pruning method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return methods[name]
