"""The bound optimisers' Adam against torch.optim's (which it replaces to keep torch._dynamo out
of the verifier's start-up)."""
from __future__ import annotations

import torch

from verifier.bounds.optim import Adam


def _loss(params, targets):
    return sum(((p - t) ** 2 * torch.arange(1, p.numel() + 1, dtype=p.dtype).view_as(p)).sum()
               for p, t in zip(params, targets))


def test_adam_matches_torch_adam_with_exponential_decay():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    targets = [torch.randn_like(p) for p in start]
    ours = [p.clone().requires_grad_(True) for p in start]
    theirs = [p.clone().requires_grad_(True) for p in start]
    adam = Adam([([ours[0]], 0.1), ([ours[1]], 0.05)], lr_decay=0.98)
    reference = torch.optim.Adam([{"params": [theirs[0]]}, {"params": [theirs[1]], "lr": 0.05}], lr=0.1)
    schedule = torch.optim.lr_scheduler.ExponentialLR(reference, 0.98)
    for _ in range(25):
        for optimiser, params in ((adam, ours), (reference, theirs)):
            optimiser.zero_grad()
            _loss(params, targets).backward()
            optimiser.step()
        schedule.step()
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=0, atol=1e-14)
    assert _loss(ours, targets) < 0.5 * _loss(start, targets)   # it did optimise


def test_restricted_adam_continues_on_a_subset_of_rows():
    """Restricted to some rows, the optimiser takes exactly the steps the full one takes there."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    full = start.clone().requires_grad_(True)
    adam = Adam([([full], 0.1)], lr_decay=0.9)
    for _ in range(3):
        adam.zero_grad()
        ((full - target) ** 2).sum().backward()
        adam.step()
    rows = torch.tensor([0, 2, 5])
    part = full.detach()[rows].clone().requires_grad_(True)
    continued = adam.restricted([part], rows)
    for _ in range(4):
        for optimiser, p, t in ((adam, full, target), (continued, part, target[rows])):
            optimiser.zero_grad()
            ((p - t) ** 2).sum().backward()
            optimiser.step()
    assert torch.allclose(part, full.detach()[rows], rtol=0, atol=1e-15)
