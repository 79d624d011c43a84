"""The one door from the pruning layer to the verifier's bound propagation.

Imported lazily so that training and magnitude pruning work even where the verifier is not
installed; methods and measurements that need bounds call ``bounded_model``.
"""
from __future__ import annotations

import torch
from torch import nn

from pruning.errors import PruningError


def bounded_model(model: nn.Module, device: torch.device | str, dtype: torch.dtype):
    """A ``verifier.BoundedModel`` of ``model``; it reads the model's current (masked)
    parameters at every call, so build it once per model and reuse it across steps."""
    try:
        from verifier import BoundedModel
    except ImportError as err:
        raise PruningError(f"the verifier's BoundedModel is not importable: {err}") from None
    return BoundedModel(model, device=device, dtype=dtype)
