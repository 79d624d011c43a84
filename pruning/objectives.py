"""Training objectives: the regime (standard, PGD) and additive regularisers, as objects.

An objective maps a model and a mini-batch ``x: (b, C, H, W)`` in [0, 1], ``y: (b,)`` to a
scalar loss. The training loop knows nothing else about the regime, so a new regime (FGSM,
CROWN-IBP in issue 7) is one more class here. Bounds come from the ``verifier`` package
(``BoundedModel``): the same code that verifies a model regularises it.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pruning.errors import PruningError


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """An L∞ PGD attack (Madry et al. 2018) inside the valid input box [lower, upper].

    ``step_size`` None means 2.5·eps/steps, Madry's choice that lets PGD cross the ball.
    """

    eps: float = 0.1
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self):
        if self.eps < 0 or self.steps < 0:
            raise PruningError(f"attack eps ({self.eps}) and steps ({self.steps}) must be ≥ 0")

    @property
    def alpha(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return 2.5 * self.eps / max(self.steps, 1)


def input_box(x: torch.Tensor, eps: float, lower: float, upper: float):
    """The eps-ball around ``x`` clipped to the valid range; returns (lo, hi), each like x."""
    return (x - eps).clamp(min=lower), (x + eps).clamp(max=upper)


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial examples maximising cross-entropy inside the clipped eps-ball.

    x: (b, C, H, W); y: (b,); returns x_adv: (b, C, H, W), detached. Runs the model in eval
    mode (BatchNorm uses running statistics) and restores the caller's mode.
    """
    lo, hi = input_box(x.detach(), attack.eps, attack.lower, attack.upper)
    if attack.eps == 0 or attack.steps == 0:
        return x.detach()
    was_training = model.training
    model.eval()
    x_adv = x.detach().clone()
    if attack.random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_adv = lo + noise * (hi - lo)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + attack.alpha * grad.sign(), lo), hi)
    model.train(was_training)
    return x_adv.detach()


class Objective(Protocol):
    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scalar training loss on the batch ``x: (b, C, H, W)``, ``y: (b,)``."""


@dataclasses.dataclass(frozen=True)
class Standard:
    """Cross-entropy on clean inputs."""

    def loss(self, model, x, y, generator):
        return F.cross_entropy(model(x), y)


@dataclasses.dataclass(frozen=True)
class PGDTraining:
    """Madry et al.: cross-entropy on PGD adversarial examples (min-max training)."""

    attack: AttackConfig

    def loss(self, model, x, y, generator):
        return F.cross_entropy(model(pgd_attack(model, x, y, self.attack, generator)), y)


REGIMES = ("standard", "pgd")


def make_regime(name: str, attack: AttackConfig) -> Objective:
    """The training regime ``name`` ("standard" or "pgd")."""
    if name == "standard":
        return Standard()
    if name == "pgd":
        return PGDTraining(attack)
    raise PruningError(f"unknown training regime {name!r}; choose one of {', '.join(REGIMES)}")


def relu_stability_loss(
    bounded, x: torch.Tensor, eps: float, lower: float = 0.0, upper: float = 1.0
) -> torch.Tensor:
    """The ReLU-stability loss of Xiao et al. (ICLR 2019), averaged over neurons and images.

    For every ReLU input with IBP bounds ``l ≤ z ≤ u`` over the clipped eps-ball around each
    image, the loss is ``-tanh(1 + l·u)``: near -1 when the neuron is stable (``l·u > 0``,
    both bounds on one side of zero) and rising towards +1 as ``l·u`` becomes more negative,
    i.e. as the interval straddles zero more widely. Its gradient pushes ``l`` and ``u`` to the
    same side of zero, which is what makes a ReLU cheap for the verifier (no relaxation, no
    branching). The ``1 +`` shifts the saturation point so that near-stable neurons with
    ``l·u`` slightly negative still get a gradient.

    bounded: a ``verifier.BoundedModel`` of the model (built once, reads current weights);
    x: (b, C, H, W) in [lower, upper]. Returns a differentiable scalar in (-1, 1).

    IBP rather than CROWN: it is cheap (one forward pass of intervals) and differentiable
    through every layer; its looseness only makes the loss conservative (an IBP-stable
    neuron is stable under CROWN too).
    """
    lo, hi = input_box(x, eps, lower, upper)
    pre_bounds = bounded.relu_bounds(lo, hi, method="ibp")
    if not pre_bounds:
        return x.new_zeros(())
    per_neuron = torch.cat([(-torch.tanh(1.0 + l * u)).flatten(1) for l, u in pre_bounds], 1)
    return per_neuron.mean()


@dataclasses.dataclass(frozen=True)
class StabilityRegularised:
    """``base loss + weight · relu_stability_loss`` (see ``relu_stability_loss``).

    Averaging over neurons (rather than Xiao et al.'s sum) keeps ``weight`` independent of
    the network's width, so one value works for the whole zoo.
    """

    base: Objective
    bounded: object  # verifier.BoundedModel of the model being trained
    eps: float
    weight: float
    lower: float = 0.0
    upper: float = 1.0

    def loss(self, model, x, y, generator):
        stability = relu_stability_loss(self.bounded, x, self.eps, self.lower, self.upper)
        return self.base.loss(model, x, y, generator) + self.weight * stability
