"""Schedules: one-shot (score, mask, fine-tune) and iterative rounds with rewinding.

Iterative (lottery ticket, Frankle & Carbin 2019; rewinding, Frankle et al. 2020; the paper's
IMP): every round prunes the same fraction ``p`` of the *remaining* weights (of the remaining
channels, for structured methods), so round ``r = 1..R`` ends at sparsity ``1 − (1 − p)^r`` and
the final one at ``S = 1 − (1 − p)^R`` (the paper: ``p`` = 0.11, ``R`` = 12, S ≈ 0.753; see
``iterative_target`` for giving ``S`` instead of ``p``). After pruning it resets the surviving
weights according to ``rewind``:

- ``rewind_lt``: to the early-training weights (the snapshot ``certiprune train`` saves after
  ``--rewind-epoch``), keeping the mask;
- ``lt``: to the initial weights;
- ``pt``: no reset (keep the trained weights);

and retrains with the method's fine-tuning objective (after ``rewind_lt`` / ``lt`` with
CROWN-IBP's eps ramp restarted over half the fine-tuning epochs: the rewound weights are not
certifiably trained). Every round is checkpointed
(``round_<r>.pt`` with masks and weights, ``round_<r>.json`` with its summary) and a rerun skips
finished rounds; the fine-tuning inside a round resumes per epoch. A round's summary holds the
sparsity overall and per layer, the channels kept per hidden layer, seconds, and whatever the
evaluator measures (``RoundEvaluator``: clean / PGD accuracy and unstable ReLUs under IBP and
CROWN); ``rounds.png`` plots accuracy and the unstable-ReLU ratio against the round.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pruning.atomic import save_torch_atomic, write_json_atomic
from pruning.data import ImageData
from pruning.errors import PruningError
from pruning.evaluate import accuracy, pgd_accuracy
from pruning.methods import Method, PruneContext
from pruning.methods.structured import channel_report, prune_channels
from pruning.objectives import AttackConfig, input_box, with_eps_ramp
from pruning.sparsity import (
    all_masks, apply_masks, check_sparsity, clone_model, make_permanent, masks_from_state_dict,
    overall_sparsity, prune_by_scores, rewind, rewind_full, scoped_sparsity, sparsity_report,
)
from pruning.train import TrainConfig, train

REWINDS = ("rewind_lt", "lt", "pt")
SCHEDULES = ("one-shot", "iterative")
DEFAULT_ROUNDS = 12  # the paper's IMP: 12 rounds of 11 %
DEFAULT_RATE = 0.11


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


@dataclasses.dataclass(frozen=True)
class Ladder:
    """The paper's ladder: ``rounds`` rounds, each pruning ``rate`` of what remains, so round
    ``r`` ends at sparsity ``1 − (1 − rate)^r`` (weights for unstructured methods, units for
    structured ones). The paper: unstructured 0.2 × 16 (to 0.9719), channels 0.11 × 12 (to
    0.7530)."""

    rate: float
    rounds: int

    def __post_init__(self):
        if not 0.0 < self.rate < 1.0 or self.rounds < 1:
            raise PruningError(f"a ladder needs a rate in (0, 1) and rounds ≥ 1, got rate "
                               f"{self.rate}, rounds {self.rounds}")

    def targets(self) -> list[float]:
        return [1 - (1 - self.rate) ** r for r in range(1, self.rounds + 1)]


UNSTRUCTURED_LADDER = Ladder(0.2, 16)
CHANNEL_LADDER = Ladder(0.11, 12)


def iterative_target(rounds: int, rate: float | None = None,
                     sparsity: float | None = None) -> float:
    """The final sparsity ``S = 1 − (1 − rate)^rounds`` of an iterative schedule.

    Give ``rate`` (fraction of the remaining weights pruned per round) or ``sparsity`` (the
    final target, from which the rate follows), or both if they agree to 1e-4; neither means
    ``DEFAULT_RATE``.
    """
    if rounds < 1:
        raise PruningError(f"rounds must be ≥ 1, got {rounds}")
    if rate is not None and not 0.0 < rate < 1.0:
        raise PruningError(f"rate must be in (0, 1), got {rate}")
    if sparsity is not None:
        check_sparsity(sparsity)
    if rate is None:
        return sparsity if sparsity is not None else 1 - (1 - DEFAULT_RATE) ** rounds
    implied = 1 - (1 - rate) ** rounds
    if sparsity is not None and abs(implied - sparsity) > 1e-4:
        raise PruningError(
            f"--sparsity {sparsity} disagrees with --rate {rate} over {rounds} rounds, which "
            f"gives 1 - (1 - {rate})^{rounds} = {implied:.6g}; give one of them")
    return implied


Evaluator = Callable[[nn.Module], dict]


@dataclasses.dataclass(frozen=True, eq=False)
class RoundEvaluator:
    """Measures a round's model: clean and PGD accuracy on ``test_data`` (images (N, C, H, W)),
    and the mean number (and ratio) of unstable ReLUs (``l < 0 < u``) under the verifier's IBP
    and CROWN bounds over the clipped ``attack.eps`` ball, on the first ``n_bound_images``
    test images (a fixed batch, so rounds compare). Bounds are taken on a copy with the masks
    made permanent, in eval mode."""

    test_data: ImageData
    attack: AttackConfig
    n_bound_images: int = 32
    chunk: int = 8  # images bounded together by CROWN (memory: see unstable_relus)
    methods: tuple[str, ...] = ("ibp", "crown")

    def __call__(self, model: nn.Module) -> dict:
        metrics = {"clean_accuracy": accuracy(model, self.test_data),
                   "pgd_accuracy": pgd_accuracy(model, self.test_data, self.attack),
                   "eps": self.attack.eps, "n_test": len(self.test_data)}
        return {**metrics, **self.unstable_relus(model)}

    @torch.no_grad()
    def unstable_relus(self, model: nn.Module) -> dict:
        from pruning.bounds import bounded_model

        frozen = clone_model(model)
        make_permanent(frozen)
        frozen.eval()
        parameter = next(frozen.parameters())
        bounded = bounded_model(frozen, parameter.device, parameter.dtype)
        x = self.test_data.images[: self.n_bound_images]
        lo, hi = input_box(x, self.attack.eps, self.attack.lower, self.attack.upper)
        result = {"n_bound_images": len(x)}
        for method in self.methods:
            # CROWN's intermediate bounds cost memory in proportion to images x neurons of a
            # layer (about 1.2 GB per image on cifar_model_deep): bound `chunk` images at a time
            chunk = len(x) if method == "ibp" else self.chunk
            per_layer: list[torch.Tensor] = []
            for start in range(0, len(x), chunk):
                bounds = bounded.relu_bounds(lo[start:start + chunk], hi[start:start + chunk],
                                             method=method)
                counts = [((l < 0) & (u > 0)).flatten(1).sum(1) for l, u in bounds]
                per_layer = counts if not per_layer else [
                    torch.cat([a, b]) for a, b in zip(per_layer, counts)]
            n_relus = sum(int(l[0].numel()) for l, _ in bounds)
            unstable = sum(per_layer)
            mean = float(unstable.float().mean()) if per_layer else 0.0
            # absolute counts per ReLU layer, mean over the images (not ratios: a pruned
            # layer's dead units would otherwise dilute them)
            result[f"unstable_per_layer_{method}"] = [float(c.float().mean()) for c in per_layer]
            result["relus_per_layer"] = [int(l[0].numel()) for l, _ in bounds]
            result[f"mean_unstable_relus_{method}"] = mean
            result[f"unstable_ratio_{method}"] = mean / max(n_relus, 1)
        result["n_relus"] = n_relus
        return result


def _summary(method_name: str, round_index: int, target: float, model: nn.Module,
             evaluate: Evaluator | None, start: float, history) -> dict:
    """The JSON summary of a finished round (``start``: its ``time.perf_counter()``)."""
    report = sparsity_report(model)
    summary = {
        "method": method_name,
        "round": round_index,
        "target_sparsity": target,
        "sparsity": overall_sparsity(report),
        "layers": {r.name: {"shape": list(r.shape), "n_weights": r.n_weights,
                            "n_zero": r.n_zero, "sparsity": r.sparsity} for r in report},
        "channels": channel_report(model),
        "finetune": [dataclasses.asdict(h) for h in history],
    }
    if evaluate is not None:
        summary.update(evaluate(model))
    summary["seconds"] = time.perf_counter() - start  # evaluation included
    return summary


def _load_round(model: nn.Module, path: Path) -> None:
    """Put a finished round's masks and weights into ``model`` (masks only grow)."""
    try:
        state = torch.load(path, weights_only=False)["model"]
        already = all_masks(model)
        masks = {name: mask for name, mask in masks_from_state_dict(state).items()
                 if name not in already or not torch.equal(mask, already[name])}
        apply_masks(model, masks)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, PruningError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PruningError(f"{path} does not match the model being pruned ({first}); "
                           "remove the rounds directory to start afresh") from None


def plot_rounds(summaries: list[dict], path: Path) -> Path:
    """A PNG of clean / PGD accuracy and the unstable-ReLU ratio (IBP, CROWN) against the
    round (fields absent from the summaries are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rounds = [s["round"] for s in summaries]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("clean_accuracy", "clean"), ("pgd_accuracy", "PGD")):
        if all(key in s for s in summaries):
            left.plot(rounds, [s[key] for s in summaries], marker="o", label=label)
    for key, label in (("unstable_ratio_ibp", "IBP"), ("unstable_ratio_crown", "CROWN")):
        if all(key in s for s in summaries):
            right.plot(rounds, [s[key] for s in summaries], marker="o", label=label)
    sparsity = ", ".join(f"{s['sparsity']:.2f}" for s in summaries)
    left.set(xlabel="round", ylabel="accuracy", title="accuracy")
    right.set(xlabel="round", ylabel="unstable ReLUs / ReLUs", title="unstable ReLU ratio")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.suptitle(f"sparsity per round: {sparsity}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_schedule(
    model: nn.Module,
    method: Method,
    sparsity: float,
    schedule: ScheduleConfig,
    ctx: PruneContext,
    finetune: TrainConfig,
    workdir: Path,
    *,
    early_state: dict | tuple[dict, dict] | None = None,
    evaluate: Evaluator | None = None,
    eval_kwargs: dict | None = None,
    targets: list[float] | None = None,
    stop_after: int | None = None,
    meta: dict | None = None,
) -> list[dict]:
    """Prune ``model`` in place to ``sparsity`` under ``schedule``; returns one summary per round.

    targets: the sparsity after each round (e.g. ``Ladder.targets()``; the last must be
    ``sparsity``); default ``round_targets(sparsity, rounds)``. stop_after: run (or load) rounds
    1..``stop_after`` only, so a caller can run one round at a time: each round is a stage file.
    early_state: what to rewind to, required by iterative schedules with ``rewind``
    "rewind_lt" or "lt": a whole ``state_dict`` (``sparsity.rewind_full``: weights, biases,
    BatchNorm parameters and running statistics) or, as before, ``(weights, biases)`` per layer
    (``sparsity.layer_weights``). evaluate(model) -> dict of metrics merged into each round's
    summary (e.g. ``RoundEvaluator``); eval_kwargs go to ``train``. Mask state lives in
    ``model`` via ``torch.nn.utils.prune``; ``ctx.layers`` limits pruning to the "conv" layers
    or "all"; the threshold is the method's own (``Method.threshold``) or ``schedule.scope``.
    For a structured ``method`` the sparsity is the fraction of units removed. Round files
    (``round_<r>.pt``: a checkpoint with ``meta`` and the round number; ``round_<r>.json``) are
    written atomically; a finished round of another method or target found there is an error.
    """
    check_sparsity(sparsity)
    rounds = schedule.rounds if schedule.kind == "iterative" else 1
    targets = list(targets) if targets is not None else round_targets(sparsity, rounds)
    if len(targets) != rounds or abs(targets[-1] - sparsity) > 1e-9:
        raise PruningError(f"{len(targets)} round targets ending at {targets[-1]:.6g} do not fit "
                           f"{rounds} rounds to {sparsity:.6g}")
    needs_rewind = schedule.kind == "iterative" and schedule.rewind != "pt"
    if needs_rewind and early_state is None:
        raise PruningError(f"rewind {schedule.rewind!r} needs the early (or initial) weights")
    threshold = method.threshold or schedule.scope
    workdir.mkdir(parents=True, exist_ok=True)
    summaries = []
    last = rounds if stop_after is None else min(stop_after, rounds)
    for index, target in enumerate(targets[:last], start=1):
        round_file = workdir / f"round_{index}.pt"
        summary_file = workdir / f"round_{index}.json"
        if round_file.is_file() and summary_file.is_file():
            finished = json.loads(summary_file.read_text())
            if (finished.get("method", method.name) != method.name
                    or abs(finished["target_sparsity"] - target) > 1e-9):
                raise PruningError(
                    f"{summary_file} is round {index} of method {finished.get('method')!r} at "
                    f"sparsity {finished['target_sparsity']:.6g}, not of {method.name!r} at "
                    f"{target:.6g}; use another output directory")
            _load_round(model, round_file)
            summaries.append(finished)
            continue
        start = time.perf_counter()
        scores = method.scores(model, target, threshold, ctx)
        if method.structured:
            prune_channels(model, scores, target, threshold, ctx.layers)
        else:
            prune_by_scores(model, scores, target, threshold, ctx.layers)
        objective = method.finetune_objective(model, ctx)
        if needs_rewind:
            if isinstance(early_state, dict):
                rewind_full(model, early_state)
            else:
                rewind(model, *early_state)
            # Rewound weights are early-training weights, not a certifiably trained model:
            # full-eps CROWN-IBP from them collapses to a constant classifier (issue 7: imp on
            # the paper study, clean 0.097). Restart the eps ramp over half the fine-tuning, as
            # dense training ramps over half its epochs and the paper's code re-creates its
            # eps scheduler after every rewind.
            objective = with_eps_ramp(objective, finetune.epochs / 2)
        history = train(
            model, objective, ctx.data, finetune,
            checkpoint=workdir / f"round_{index}.train.pt", progress=ctx.progress,
            desc=f"finetune r{index}", **(eval_kwargs or {}),
        )
        summary = _summary(method.name, index, target, model, evaluate, start, history)
        summary.update(layers=ctx.layers, threshold=threshold,
                       scoped_sparsity=scoped_sparsity(model, ctx.layers))
        save_torch_atomic({"format": 1, "meta": {**(meta or {}), "round": index},
                           "model": model.state_dict()}, round_file)
        write_json_atomic(summary_file, summary, indent=2)
        (workdir / f"round_{index}.train.pt").unlink(missing_ok=True)
        summaries.append(summary)
        plot_rounds(summaries, workdir / "rounds.png")
    if not (workdir / "rounds.png").is_file():
        plot_rounds(summaries, workdir / "rounds.png")
    return summaries
