"""Training objectives: the regimes (standard, PGD, FGSM+GradAlign, CROWN-IBP) and additive
regularisers, as objects.

An objective maps a model and a mini-batch ``x: (b, C, H, W)`` in [0, 1], ``y: (b,)`` to a
scalar loss. The training loop knows nothing else about the regime, so a new regime is one more
class here. Bounds come from the ``verifier`` package (``BoundedModel``): the same code that
verifies a model regularises and certifiably trains it.

An objective whose loss depends on how far training has got (CROWN-IBP's eps ramp) also has
``scheduled(epochs_done) -> Objective``; ``train`` calls it before every step through
``scheduled`` below, and wrappers forward it to the objective they wrap. An objective used
without it (e.g. wrapped by one that does not forward it) behaves as at the end of its ramp.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
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


def scheduled(objective: Objective, epochs_done: float) -> Objective:
    """``objective`` as it should be used ``epochs_done`` (fractional) epochs into training:
    ``objective.scheduled(epochs_done)`` when it has a schedule, else ``objective`` itself."""
    schedule = getattr(objective, "scheduled", None)
    return schedule(epochs_done) if schedule is not None else objective


def with_eps_ramp(objective: Objective, ramp_epochs: float) -> Objective:
    """``objective`` with CROWN-IBP's eps ramp restarted over ``ramp_epochs`` (looking through
    wrappers that hold a ``base`` objective); objectives without a ramp come back unchanged."""
    if isinstance(objective, CrownIBPTraining):
        return dataclasses.replace(objective, ramp_epochs=ramp_epochs, epochs_done=None)
    base = getattr(objective, "base", None)
    if base is not None and dataclasses.is_dataclass(objective):
        return dataclasses.replace(objective, base=with_eps_ramp(base, ramp_epochs))
    return objective


def refresh_pruned_parameters(model: nn.Module) -> None:
    """Recompute every ``torch.nn.utils.prune`` attribute (``weight = weight_orig · mask``).

    Prune refreshes ``module.weight`` only in a forward pre-hook, so after an optimiser step it
    is stale until the next forward. The verifier reads pruned Linear/Conv weights through the
    reparametrisation, but a pruned BatchNorm's γ/β through the stale attribute; calling this
    before computing bounds makes them current and differentiable (see the issue report in
    ``methods.nrs``).
    """
    from torch.nn.utils import prune

    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                hook(module, ())


# ------------------------------------------------------------------ FGSM + GradAlign

def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    create_graph: bool) -> torch.Tensor:
    """∂ CE(model(x), y) / ∂x, (b, C, H, W); with ``create_graph`` it is differentiable in the
    weights (double back-propagation)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=create_graph)
    return grad


def grad_align_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    generator: torch.Generator, lower: float = 0.0,
                    upper: float = 1.0) -> torch.Tensor:
    """GradAlign (Andriushchenko & Flammarion, NeurIPS 2020): ``mean_b (1 − cos(g_clean, g_rand))``.

    ``g_clean`` is the input gradient of the cross-entropy at the clean ``x``, ``g_rand`` at a
    uniformly random point of the clipped eps-ball; x: (b, C, H, W). As in the authors' code,
    ``g_clean`` is a constant and ``g_rand`` is taken with ``create_graph=True``, so the term
    trains the weights to keep the loss locally linear — the property FGSM relies on, whose
    absence is catastrophic overfitting. Runs in the model's current mode.
    """
    lo, hi = input_box(x.detach(), eps, lower, upper)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    g_clean = _input_gradient(model, x, y, create_graph=False).flatten(1)
    g_rand = _input_gradient(model, lo + noise * (hi - lo), y, create_graph=True).flatten(1)
    cosine = F.cosine_similarity(g_clean, g_rand, dim=1, eps=1e-12)
    return (1.0 - cosine).mean()


@dataclasses.dataclass(frozen=True)
class FGSMTraining:
    """Fast adversarial training (Wong et al. 2020) with GradAlign.

    One FGSM step of size ``step_factor · eps`` (1.25, Wong et al.) from a uniform random start
    in the eps-ball, clipped to the ball and to [lower, upper] — ``pgd_attack`` with one step
    (eval mode, so BatchNorm statistics are not fed attack points); then cross-entropy on the
    adversarial points plus ``grad_align_weight · grad_align_loss`` (0.2, the authors' value
    for CIFAR-10 at 8/255).
    """

    attack: AttackConfig
    grad_align_weight: float = 0.2
    step_factor: float = 1.25

    def loss(self, model, x, y, generator):
        fgsm = dataclasses.replace(self.attack, steps=1, random_start=True,
                                   step_size=self.step_factor * self.attack.eps)
        adversarial = F.cross_entropy(model(pgd_attack(model, x, y, fgsm, generator)), y)
        if self.grad_align_weight == 0 or self.attack.eps == 0:
            return adversarial
        align = grad_align_loss(model, x, y, self.attack.eps, generator,
                                self.attack.lower, self.attack.upper)
        return adversarial + self.grad_align_weight * align


# ------------------------------------------------------------------ CROWN-IBP

def smoothed_ramp(fraction: float, mid: float = 0.25, power: float = 4.0) -> float:
    """auto_LiRPA's ``SmoothedScheduler`` shape on [0, 1]: ``a·s^power`` up to ``mid``, then
    the tangent line from there, ``a`` chosen so the ramp ends at 1. Returns a value in [0, 1]
    (0 before, 1 after the ramp); continuous with a continuous slope at ``mid``."""
    s = min(max(fraction, 0.0), 1.0)
    a = 1.0 / (mid ** power + power * mid ** (power - 1) * (1.0 - mid))
    if s < mid:
        return a * s ** power
    return min(a * mid ** power + a * power * mid ** (power - 1) * (s - mid), 1.0)


def margin_spec(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Rows ``e_y − e_j`` for every wrong class j, in class order: (b, n_classes − 1, n_classes).

    ``spec @ logits`` are the margins; the property holds on a box iff all their lower
    bounds are > 0.
    """
    eye = torch.eye(n_classes, dtype=torch.float32, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (b, K, K), row j = e_y − e_j
    wrong = ~torch.eye(n_classes, dtype=torch.bool, device=y.device)[y]  # (b, K)
    return rows[wrong].view(len(y), n_classes - 1, n_classes)


def worst_case_cross_entropy(margin_lower: torch.Tensor) -> torch.Tensor:
    """CE of the worst-case logits of Wong & Kolter / Zhang et al.: the true class at 0, wrong
    class j at ``−lower(f_y − f_j)``; margin_lower: (b, K − 1). Equals the clean CE when the
    bounds are exact at a point (CE is shift-invariant)."""
    logits = torch.cat([margin_lower.new_zeros(len(margin_lower), 1), -margin_lower], 1)
    return F.cross_entropy(logits, margin_lower.new_zeros(len(margin_lower), dtype=torch.long))


@dataclasses.dataclass(frozen=True)
class CrownIBPTraining:
    """Certified training, CROWN-IBP (Zhang et al., ICLR 2020):

        L = κ · CE(f(x), y) + (1 − κ) · CE(worst-case logits from m̲),
        m̲ = β · m̲_CROWN-IBP + (1 − β) · m̲_IBP,

    ``m̲`` the lower bounds of the margins ``f_y − f_j`` (``margin_spec``) over the clipped
    ball of radius ``eps_t`` around x, computed by our ``verifier.BoundedModel`` on the live
    module (differentiable in the weights). During the first ``ramp_epochs`` (fractional
    progress ``s = epochs_done / ramp_epochs``): ``eps_t = eps · smoothed_ramp(s)``,
    ``β = 1 − s`` and ``κ = 1 − s`` (the paper's β 1→0, κ 1→0 schedules, linear in s); after
    it ``eps_t = eps``, β = κ = 0 (pure IBP bounds, pure worst-case loss — what CROWN-IBP's
    best models end with). ``ramp_epochs = 0`` starts at the end (fine-tuning a model that is
    already certifiably trained). β = 0 skips the CROWN pass.

    BatchNorm: the verifier bounds BatchNorm with its running statistics (eval semantics,
    whatever ``model.training``), so the bounds are those of the network that will be
    verified; the clean term runs in the model's mode (train: batch statistics, which also
    update the running ones). ``epochs_done`` None (no ``train`` schedule) means the end of
    the ramp.
    """

    eps: float
    ramp_epochs: float = 0.0
    lower: float = 0.0
    upper: float = 1.0
    epochs_done: float | None = None
    _bounded: weakref.WeakKeyDictionary = dataclasses.field(
        default_factory=weakref.WeakKeyDictionary, compare=False, repr=False)

    def __post_init__(self):
        if self.eps < 0 or self.ramp_epochs < 0:
            raise PruningError(f"CROWN-IBP eps ({self.eps}) and ramp epochs "
                               f"({self.ramp_epochs}) must be ≥ 0")

    def scheduled(self, epochs_done: float) -> "CrownIBPTraining":
        return dataclasses.replace(self, epochs_done=epochs_done)

    def progress(self) -> float:
        """The ramp fraction s in [0, 1]."""
        if self.epochs_done is None or self.ramp_epochs == 0:
            return 1.0
        return min(max(self.epochs_done / self.ramp_epochs, 0.0), 1.0)

    def coefficients(self) -> tuple[float, float, float]:
        """``(eps_t, β, κ)`` at the current progress."""
        s = self.progress()
        return self.eps * smoothed_ramp(s), 1.0 - s, 1.0 - s

    def bounded(self, model: nn.Module, x: torch.Tensor):
        """The cached ``BoundedModel`` of ``model`` (built once per model)."""
        if model not in self._bounded:
            from pruning.bounds import bounded_model

            self._bounded[model] = bounded_model(model, x.device, x.dtype)
        return self._bounded[model]

    def margin_lower_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            eps: float, beta: float) -> torch.Tensor:
        """``β·m̲_CROWN-IBP + (1 − β)·m̲_IBP`` over the clipped eps-ball: (b, K − 1)."""
        bounded = self.bounded(model, x)
        refresh_pruned_parameters(model)
        graph = bounded.graph(tuple(x.shape[1:]))
        n_classes = graph.nodes[graph.output].numel
        spec = margin_spec(y, n_classes).to(x.dtype)
        lo, hi = input_box(x, eps, self.lower, self.upper)
        lower, _ = bounded.compute_bounds(lo, hi, spec=spec, method="ibp")
        if beta > 0:
            crown_lower, _ = bounded.compute_bounds(lo, hi, spec=spec, method="crown-ibp")
            lower = beta * crown_lower + (1.0 - beta) * lower
        return lower

    def loss(self, model, x, y, generator):
        eps, beta, kappa = self.coefficients()
        clean = F.cross_entropy(model(x), y)
        if kappa == 1.0:
            return clean
        robust = worst_case_cross_entropy(self.margin_lower_bounds(model, x, y, eps, beta))
        return kappa * clean + (1.0 - kappa) * robust


REGIMES = ("standard", "pgd", "fgsm", "crown-ibp")


def make_regime(name: str, attack: AttackConfig, *, ramp_epochs: float = 0.0,
                grad_align_weight: float = 0.2) -> Objective:
    """The training regime ``name`` (one of ``REGIMES``) at radius ``attack.eps``.

    ``ramp_epochs``: CROWN-IBP's eps ramp (0: full eps from the start, right for fine-tuning);
    ``grad_align_weight``: FGSM's GradAlign weight.
    """
    if name == "standard":
        return Standard()
    if name == "pgd":
        return PGDTraining(attack)
    if name == "fgsm":
        return FGSMTraining(attack, grad_align_weight=grad_align_weight)
    if name == "crown-ibp":
        return CrownIBPTraining(attack.eps, ramp_epochs=ramp_epochs, lower=attack.lower,
                                upper=attack.upper)
    raise PruningError(f"unknown training regime {name!r}; choose one of {', '.join(REGIMES)}")


# ------------------------------------------------------------------ ReLU stability

def relu_stability_terms(
    bounded, x: torch.Tensor, eps: float, lower: float = 0.0, upper: float = 1.0,
    normalisers: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Per-neuron ReLU-stability terms ``−tanh(1 + l·u / n)`` for every ReLU, in graph order.

    ``l, u``: the verifier's differentiable IBP bounds of the ReLU's input over the clipped
    eps-ball around each image; ``n``: ``normalisers[i]`` for ReLU i (broadcastable against
    its ``(b, *shape)`` bounds, e.g. ``(C, 1, 1)``; used as given, so detach it to keep it out
    of the gradient), or 1 where None / not given. Returns one ``(b, *shape)`` tensor per ReLU.
    """
    lo, hi = input_box(x, eps, lower, upper)
    pre_bounds = bounded.relu_bounds(lo, hi, method="ibp")
    if normalisers is not None and len(normalisers) != len(pre_bounds):
        raise PruningError(f"{len(normalisers)} normalisers given for {len(pre_bounds)} ReLUs")
    terms = []
    for index, (l, u) in enumerate(pre_bounds):
        product = l * u
        if normalisers is not None and normalisers[index] is not None:
            product = product / normalisers[index]
        terms.append(-torch.tanh(1.0 + product))
    return terms


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
    terms = relu_stability_terms(bounded, x, eps, lower, upper)
    if not terms:
        return x.new_zeros(())
    return torch.cat([t.flatten(1) for t in terms], 1).mean()


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

    def scheduled(self, epochs_done: float) -> "StabilityRegularised":
        return dataclasses.replace(self, base=scheduled(self.base, epochs_done))

    def loss(self, model, x, y, generator):
        base = self.base.loss(model, x, y, generator)
        refresh_pruned_parameters(model)
        stability = relu_stability_loss(self.bounded, x, self.eps, self.lower, self.upper)
        return base + self.weight * stability
