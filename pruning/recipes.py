"""The train and prune recipes, written once: ``certiprune train`` / ``certiprune prune``
(``pruning.cli``) and the study's stages (``pruning.study.pipeline``) both build a recipe and
call ``train_dense`` / ``prune_checkpoint``; what they add is only how they report.

A ``DenseRecipe`` pre-trains one zoo model under a regime (optionally with a loss term that is on
from pre-training: the paper's NRS loss or its slimming penalty) and leaves ``init.pt``,
``rewind.pt`` (the whole state after ``rewind_epoch`` epochs: weights, BatchNorm statistics)
and ``model.pt``. A ``PruneRecipe`` prunes a checkpoint under a schedule, one round per stage
file (``pruning.schedule.run_schedule``), rewinding after every round to the whole early state
with the learning rate at the schedule position of the rewind epoch.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pruning.checkpoint import load_checkpoint, save_checkpoint
from pruning.data import ImageData, dataset_info
from pruning.errors import PruningError
from pruning.models import build_model
from pruning.objectives import AttackConfig, Objective, make_regime
from pruning.train import EpochRecord, TrainConfig, train

REGULARISERS = ("nrs", "slim")


@dataclasses.dataclass(frozen=True)
class DenseRecipe:
    """Pre-training of one dense model. ``regulariser``: None, "nrs" (``rs_weight``, default
    the paper's 0.01 / 0.001 under CROWN-IBP; ``gamma_pow``) or "slim" (``slim_penalty`` ·
    mean|γ| at every step)."""

    model: str
    dataset: str
    regime: str
    attack: AttackConfig
    train: TrainConfig
    seed: int = 0
    rewind_epoch: int = 1
    ramp_epochs: float | None = None  # crown-ibp eps ramp; None: half the epochs
    grad_align_weight: float = 0.2
    regulariser: str | None = None
    rs_weight: float | None = None
    gamma_pow: float = 2.0
    slim_penalty: float = 1e-4

    def __post_init__(self):
        if not 0 <= self.rewind_epoch <= self.train.epochs:
            raise PruningError(f"rewind epoch {self.rewind_epoch} is not in "
                               f"0..{self.train.epochs} (the training epochs)")
        if self.regulariser not in (None, *REGULARISERS):
            raise PruningError(f"unknown regulariser {self.regulariser!r}; choose one of "
                               f"{', '.join(REGULARISERS)}")

    def meta(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "regime": self.regime,
                "eps": self.attack.eps, "seed": self.seed, "regulariser": self.regulariser}


def regularised(objective: Objective, regulariser: str | None, model: nn.Module, attack,
                device, dtype, *, rs_weight: float | None = None, gamma_pow: float = 2.0,
                slim_penalty: float = 1e-4) -> tuple[Objective, dict]:
    """``objective`` plus the loss term named by ``regulariser`` for ``model``; also returns
    the term's settings (for the summaries)."""
    if regulariser is None:
        return objective, {}
    if regulariser == "slim":
        from pruning.methods.structured import SlimPenalty, slim_batch_norms

        norms = slim_batch_norms(model)
        if not norms:
            raise PruningError("the slimming penalty needs BatchNorm layers; this model has none")
        return SlimPenalty(objective, norms, slim_penalty), {"slim_penalty": slim_penalty}
    from pruning.bounds import bounded_model
    from pruning.methods.nrs import NRSConfig, NRSRegularised, default_rs_weight

    weight = rs_weight if rs_weight is not None else default_rs_weight(objective)
    return (NRSRegularised(objective, bounded_model(model, device, dtype), attack.eps, weight,
                           attack.lower, attack.upper, NRSConfig(gamma_pow=gamma_pow)),
            {"rs_weight": weight, "gamma_pow": gamma_pow})


def train_dense(recipe: DenseRecipe, train_data: ImageData, out: Path, *,
                eval_data: ImageData | None = None, device="cpu", dtype=torch.float32,
                progress: bool = True, desc: str = "train"
                ) -> tuple[nn.Module, dict, list[EpochRecord]]:
    """Train ``recipe`` into ``out`` (``init.pt``, ``rewind.pt``, ``train.ckpt`` while
    training, so an interrupted run resumes per epoch, then ``model.pt``). Returns the model,
    its checkpoint meta (with the regulariser's settings and the objective's name) and the
    epoch records."""
    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = build_model(recipe.model, dataset_info(recipe.dataset)).to(device=device,
                                                                              dtype=dtype)
    ramp = recipe.ramp_epochs if recipe.ramp_epochs is not None else recipe.train.epochs / 2
    objective = make_regime(recipe.regime, recipe.attack, ramp_epochs=ramp,
                            grad_align_weight=recipe.grad_align_weight)
    objective, extra = regularised(objective, recipe.regulariser, model, recipe.attack, device,
                                   dtype, rs_weight=recipe.rs_weight,
                                   gamma_pow=recipe.gamma_pow, slim_penalty=recipe.slim_penalty)
    meta = {**recipe.meta(), **extra}
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "init.pt").is_file():
        save_checkpoint(out / "init.pt", model, {**meta, "epoch": 0})
        if recipe.rewind_epoch == 0:
            save_checkpoint(out / "rewind.pt", model, {**meta, "epoch": 0})

    def snapshot(epoch, trained):
        if epoch == recipe.rewind_epoch:  # the whole state: weights and BatchNorm statistics
            save_checkpoint(out / "rewind.pt", trained, {**meta, "epoch": epoch})

    history = train(model, objective, train_data, recipe.train, eval_data=eval_data,
                    eval_attack=recipe.attack if eval_data is not None else None,
                    checkpoint=out / "train.ckpt", after_epoch=snapshot, progress=progress,
                    desc=desc)
    meta = {**meta, "epoch": recipe.train.epochs, "objective": type(objective).__name__}
    save_checkpoint(out / "model.pt", model, meta)
    (out / "train.ckpt").unlink(missing_ok=True)
    return model, meta, history


@dataclasses.dataclass(frozen=True)
class PruneRecipe:
    """Pruning of a checkpoint by ``method`` to ``target`` under ``schedule``.

    targets: the sparsity after each round (a ``schedule.Ladder``'s), default the geometric
    split of ``target``; layers: "all" or "conv"; finetune: the retraining of each round (after
    a rewind its lr starts at the schedule position of the rewind epoch); at_init: prune the
    initial weights (``init.pt`` beside the checkpoint) instead.
    """

    method: str
    target: float
    schedule: object  # pruning.schedule.ScheduleConfig
    regime: str
    attack: AttackConfig
    finetune: TrainConfig
    score_training: TrainConfig
    layers: str = "all"
    targets: tuple[float, ...] | None = None
    stability_weight: float = 0.5
    score_batches: int | None = None
    slim_penalty: float = 1e-4
    seed: int = 0
    at_init: bool = False


def companion(checkpoint: Path, name: str, meta: dict, device="cpu", dtype=torch.float32):
    """The checkpoint ``name`` (init.pt / rewind.pt) beside ``checkpoint``: (model, meta); it
    must hold the same zoo model on the same dataset."""
    model, other = load_checkpoint(Path(checkpoint).parent / name, device, dtype)
    if (other["model"], other["dataset"]) != (meta["model"], meta["dataset"]):
        raise PruningError(f"{Path(checkpoint).parent / name} holds {other['model']} on "
                           f"{other['dataset']}, but {checkpoint} holds {meta['model']} on "
                           f"{meta['dataset']}")
    return model, other


def prune_checkpoint(recipe: PruneRecipe, checkpoint: Path, train_data: ImageData,
                     workdir: Path, *, evaluate=None, device="cpu", dtype=torch.float32,
                     progress: bool = True, stop_after: int | None = None
                     ) -> tuple[nn.Module, dict, list[dict]]:
    """Prune the model of ``checkpoint`` by ``recipe``; round files go to ``workdir``
    (``run_schedule``: a rerun loads finished rounds; ``stop_after`` runs rounds up to that
    one only). Returns the model (masks still attached), the checkpoint's meta and the round
    summaries."""
    from pruning.methods import PruneContext, get_method
    from pruning.methods.structured import check_channel_fraction, mask_existing_zeros
    from pruning.schedule import run_schedule

    method = get_method(recipe.method)
    model, meta = load_checkpoint(checkpoint, device, dtype)
    if recipe.at_init:
        model, _ = companion(checkpoint, "init.pt", meta, device, dtype)
    if "method" in meta:  # an already pruned checkpoint: its zeros stay zeros
        mask_existing_zeros(model)
    if method.structured and (method.threshold or recipe.schedule.scope) == "layer":
        check_channel_fraction(model, recipe.target)
    schedule, finetune = recipe.schedule, recipe.finetune
    early_state = None
    if schedule.kind == "iterative" and schedule.rewind != "pt":
        source = "rewind.pt" if schedule.rewind == "rewind_lt" else "init.pt"
        early, early_meta = companion(checkpoint, source, meta, device, dtype)
        early_state = early.state_dict()
        # learning-rate rewinding: retraining resumes the schedule at the rewind epoch
        finetune = dataclasses.replace(finetune, lr_offset_epochs=int(early_meta.get("epoch", 0)))
    ctx = PruneContext(
        data=train_data, objective=make_regime(recipe.regime, recipe.attack),
        attack=recipe.attack, device=device, dtype=dtype, score_training=recipe.score_training,
        stability_weight=recipe.stability_weight, score_batches=recipe.score_batches,
        slim_penalty=recipe.slim_penalty, seed=recipe.seed, progress=progress,
        layers=recipe.layers)
    model.train()
    rounds = run_schedule(
        model, method, recipe.target, schedule, ctx, finetune, Path(workdir),
        early_state=early_state, evaluate=evaluate,
        targets=list(recipe.targets) if recipe.targets is not None else None,
        stop_after=stop_after,
        meta={**meta, "regime": recipe.regime, "eps": recipe.attack.eps,
              "method": recipe.method, "layers": recipe.layers})
    return model, meta, rounds
