"""The one training loop: pre-training, HYDRA score learning and fine-tuning all run here.

What is trained is whatever ``model.parameters()`` still require a gradient (weights, or only
HYDRA's scores when the weights are frozen); what is minimised is an ``Objective``. Pruned
layers train through ``torch.nn.utils.prune``'s ``weight_orig × weight_mask``, so masked
weights get zero gradient and the sparsity cannot drift.

Deterministic on CPU for a given ``TrainConfig.seed``: shuffling and PGD random starts draw from
one ``torch.Generator`` whose state is checkpointed with the model, so an interrupted run resumes
to the same result.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from pruning.atomic import save_torch_atomic
from pruning.data import ImageData, batches
from pruning.errors import PruningError
from pruning.evaluate import accuracy, pgd_accuracy
from pruning.objectives import AttackConfig, Objective, scheduled

LR_SCHEDULES = ("cosine", "constant", "step")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule.

    ``lr_schedule`` "cosine" anneals per step to 0; "step" multiplies the lr by ``lr_decay``
    after each epoch listed in ``lr_milestones`` (1-based; empty: after 50 % and 75 % of the
    epochs); "constant" keeps it.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # one of LR_SCHEDULES
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    seed: int = 0
    # Schedule position at the start: the lr follows the schedule of an (epochs + offset)-epoch
    # run from epoch ``lr_offset_epochs`` on (learning-rate rewinding after a weight rewind to
    # that epoch, as the paper's code steps its MultiStepLR ``rewind_epoch`` times).
    lr_offset_epochs: int = 0

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise PruningError(f"unknown optimizer {self.optimizer!r}; choose 'adam' or 'sgd'")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PruningError(f"unknown lr schedule {self.lr_schedule!r}; choose one of "
                               f"{', '.join(LR_SCHEDULES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise PruningError("epochs must be ≥ 0, batch size ≥ 1 and lr > 0")
        if self.lr_offset_epochs < 0:
            raise PruningError(f"lr_offset_epochs must be ≥ 0, got {self.lr_offset_epochs}")
        if any(m < 1 for m in self.lr_milestones) or not 0 < self.lr_decay <= 1:
            raise PruningError(f"lr milestones {self.lr_milestones} must be epochs ≥ 1 and the "
                               f"lr decay {self.lr_decay} in (0, 1]")

    def milestones(self) -> tuple[int, ...]:
        """The epochs after which a "step" schedule decays the lr."""
        if self.lr_milestones:
            return tuple(sorted(self.lr_milestones))
        epochs = self.epochs + self.lr_offset_epochs
        return tuple(sorted({max(epochs // 2, 1), max(3 * epochs // 4, 1)}))

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based over this run; the schedule
        starts ``lr_offset_epochs`` epochs in)."""
        step += self.lr_offset_epochs * steps_per_epoch
        if self.lr_schedule == "cosine":
            total = max((self.epochs + self.lr_offset_epochs) * steps_per_epoch, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        if self.lr_schedule == "step":
            epochs_done = step // steps_per_epoch
            return self.lr * self.lr_decay ** sum(epochs_done >= m for m in self.milestones())
        return self.lr


# The optimiser and schedule each regime trains with unless told otherwise: fast adversarial
# training as Wong et al. / Andriushchenko & Flammarion (SGD 0.01, momentum 0.9, weight decay
# 5e-4, step decay); CROWN-IBP as Zhang et al. (Adam 5e-4, step decay). Standard and PGD keep
# the TrainConfig defaults (Adam 1e-3, cosine).
REGIME_TRAINING: dict[str, dict] = {
    "standard": {},
    "pgd": {},
    "fgsm": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, lr_schedule="step"),
    "crown-ibp": dict(optimizer="adam", lr=5e-4, lr_schedule="step"),
}


def regime_train_config(regime: str, **overrides) -> TrainConfig:
    """``TrainConfig`` with ``regime``'s defaults (``REGIME_TRAINING``), then ``overrides``
    (keyword arguments that are None are ignored, so unset command-line flags can be passed)."""
    if regime not in REGIME_TRAINING:
        raise PruningError(f"unknown training regime {regime!r}; choose one of "
                           f"{', '.join(REGIME_TRAINING)}")
    fields = {**REGIME_TRAINING[regime],
              **{key: value for key, value in overrides.items() if value is not None}}
    return TrainConfig(**fields)


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean training loss over the epoch
    clean_accuracy: float | None  # on the evaluation set
    pgd_accuracy: float | None
    seconds: float


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def train(
    model: nn.Module,
    objective: Objective,
    data: ImageData,
    config: TrainConfig,
    *,
    eval_data: ImageData | None = None,
    eval_attack: AttackConfig | None = None,
    checkpoint: Path | None = None,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[EpochRecord]:
    """Minimise ``objective`` over ``data`` (images (N, C, H, W) in [0, 1], on the model's
    device and dtype) for ``config.epochs`` epochs.

    After every epoch: evaluates clean (and, with ``eval_attack``, PGD) accuracy on
    ``eval_data``, calls ``after_epoch(epoch, model)``, and saves ``checkpoint`` (model,
    optimiser, generator, history). If ``checkpoint`` exists the run resumes from it; the
    model must then have the same structure (including its pruning masks) as when saved.
    ``after_step`` runs after each optimiser step (HYDRA refreshes its top-k there). Before
    each step the objective is ``objectives.scheduled(objective, epochs_done)`` (CROWN-IBP's
    eps ramp follows the step count, so a resumed run continues the ramp where it stopped).
    Returns one record per epoch, resumed epochs included.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PruningError("nothing to train: no parameter of the model requires a gradient")
    optimizer = _optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[EpochRecord] = []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise PruningError(f"cannot resume from {checkpoint}: it does not match the model "
                               f"or optimiser being trained ({first})") from None
        generator.set_state(state["generator"])
        history = [EpochRecord(**record) for record in state["history"]]
    steps_per_epoch = max(math.ceil(len(data) / config.batch_size), 1)
    model.train()
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        loss_sum, n_seen = 0.0, 0
        epoch_batches = batches(data, config.batch_size, generator)
        bar = tqdm(
            epoch_batches, desc=f"{desc} {epoch}/{config.epochs}",
            disable=None if progress else True,  # None: no bar when stderr is not a terminal
            leave=False, file=sys.stderr,
        )
        for step, (x, y) in enumerate(bar, start=(epoch - 1) * steps_per_epoch):
            if config.lr_schedule != "constant":
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step, steps_per_epoch)
            loss = scheduled(objective, step / steps_per_epoch).loss(model, x, y, generator)
            if not torch.isfinite(loss.detach()):
                raise PruningError(f"training diverged: loss {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}")
        clean = pgd = None
        if eval_data is not None:
            clean = accuracy(model, eval_data)
            if eval_attack is not None:
                pgd = pgd_accuracy(model, eval_data, eval_attack, seed=config.seed)
        history.append(
            EpochRecord(epoch, loss_sum / max(n_seen, 1), clean, pgd, time.perf_counter() - start)
        )
        if progress:
            record = history[-1]
            parts = [f"{desc} epoch {epoch}/{config.epochs}", f"loss {record.loss:.4f}"]
            if clean is not None:
                parts.append(f"clean acc {clean:.4f}")
            if pgd is not None:
                parts.append(f"PGD acc {pgd:.4f}")
            print(", ".join(parts) + f", {record.seconds:.1f} s", file=sys.stderr)
        if after_epoch is not None:
            after_epoch(epoch, model)
        if checkpoint is not None:
            save_torch_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "history": [dataclasses.asdict(r) for r in history],
                },
                Path(checkpoint),
            )
    return history
