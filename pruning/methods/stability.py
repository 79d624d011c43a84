"""Neuron-stability pruning: keep the weights that make ReLUs stable over the eps-ball.

The idea of Li et al. (TMLR 2023): a pruned network is cheaper to verify when fewer ReLUs are
unstable (pre-activation bounds straddling zero), so the stability of ReLUs should decide both
which weights survive and how the survivors are fine-tuned. This unstructured variant is
HYDRA score learning (``methods.hydra``) and fine-tuning, both on

    L(θ) = L_regime(θ) + λ · mean_{images, ReLUs} [ −tanh(1 + l·u) ]

where ``l, u`` are the verifier's differentiable IBP bounds of each ReLU's input over the eps-ball
(clipped to [0, 1]) around each training image (Xiao et al. 2019's RS loss; see
``objectives.relu_stability_loss``), ``L_regime`` is cross-entropy on clean (standard) or PGD
(adversarial) inputs, and λ = ``PruneContext.stability_weight``.

Weighting: the RS term is a mean, so it lies in (−1, 1) whatever the width (Xiao et al. sum
over neurons, which ties λ to the architecture), against a cross-entropy of ~0.3–2.3. The
default λ = 0.5 was chosen by a sweep: one epoch of fine-tuning a 90 %-sparse Fashion-MNIST
mlp2x256 on 20k images, eps 0.1, 200 test images (clean accuracy; mean unstable ReLUs of 512
under CROWN): λ = 0 → 0.88, 331; 0.01 → 0.88, 310; 0.1 → 0.87, 233; 0.3 → 0.85, 138;
0.5 → 0.84, 104; 1.0 → 0.835, 68. Below 0.1 the term barely acts; from 0.5 on the network
gives up ~4 points of clean accuracy for a 3× cut in unstable ReLUs, and larger λ buys more
stability at little further cost in accuracy. The paper's structured NRS (issue 7) uses 0.01 on
top of FGSM training, where the adversarial loss itself already favours stability. The eps of
the ball is the training attack's eps (the certification radius).

Issue 7's ``nrs`` differs: structured (channels ranked by their mean NRS score), with BN-scaled
bounds ``l·u / (|γ|^p + ε)``.
"""
from __future__ import annotations

from torch import nn

from pruning.bounds import bounded_model
from pruning.methods.hydra import learn_scores
from pruning.objectives import Objective, StabilityRegularised
from pruning.sparsity import Scores


def stability_objective(model: nn.Module, ctx) -> Objective:
    """The regime's loss plus ``ctx.stability_weight`` × the ReLU-stability loss of ``model``."""
    return StabilityRegularised(
        base=ctx.objective,
        bounded=bounded_model(model, ctx.device, ctx.dtype),
        eps=ctx.attack.eps,
        weight=ctx.stability_weight,
        lower=ctx.attack.lower,
        upper=ctx.attack.upper,
    )


def stability_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """HYDRA scores learned on the stability-regularised objective."""
    return learn_scores(model, sparsity, scope, lambda student: stability_objective(student, ctx),
                        ctx.data, ctx.score_training, ctx.progress, layers=ctx.layers)
