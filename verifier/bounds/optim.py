"""Projected Adam for the bound optimisers (alpha-CROWN's slopes, beta-CROWN's multipliers).

Adam (Kingma & Ba, ICLR 2015) with an exponentially decaying step, written out in tensor ops:
the first use of ``torch.optim`` imports ``torch._dynamo`` (its methods are wrapped to disable
compilation), which costs a second or more of every verification process's start-up. The update
is torch.optim.Adam's (default betas and eps, no weight decay) followed by
torch.optim.lr_scheduler.ExponentialLR's decay.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class Adam:
    """Adam over parameter groups ``[(tensors, lr), ...]``; ``step`` updates every tensor that
    has a gradient, then multiplies each step size by ``lr_decay``."""

    def __init__(self, groups: list[tuple[list[Tensor], float]], lr_decay: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for tensors, _ in groups for p in tensors]
        self.lrs = [lr for tensors, lr in groups for _ in tensors]
        self.lr_decay, self.betas, self.eps = lr_decay, betas, eps
        self.steps = 0
        self.averages = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        correction1 = 1 - beta1 ** self.steps
        correction2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        for p, lr, (mean, square) in zip(self.params, self.lrs, self.averages):
            if p.grad is None:
                continue
            mean.lerp_(p.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (square.sqrt() / correction2_sqrt).add_(self.eps)
            p.addcdiv_(mean, denom, value=-lr / correction1)
        self.lrs = [lr * self.lr_decay for lr in self.lrs]

    def restricted(self, params: list[Tensor], rows: Tensor) -> "Adam":
        """This optimiser continued on ``params``, which hold rows ``rows`` (first dimension) of
        its tensors, in the same order: the same step count and step sizes, those rows' averages."""
        other = Adam([(params, 0.0)], self.lr_decay, self.betas, self.eps)
        other.lrs, other.steps = list(self.lrs), self.steps
        other.averages = [(mean[rows], square[rows]) for mean, square in self.averages]
        return other
