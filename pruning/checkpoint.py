"""Model checkpoints: the zoo name, dataset and training facts next to the state dict.

A checkpoint is ``torch.save`` of ``{"format": 1, "meta": {...}, "model": state_dict}``, where
``meta`` holds at least ``model`` (zoo name) and ``dataset``. State dicts of pruned models hold
``weight_orig`` / ``weight_mask``; loading reinstates the masks with ``prune.custom_from_mask``
first so the keys match.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pruning.atomic import save_torch_atomic
from pruning.data import dataset_info
from pruning.errors import PruningError, PruningFileError
from pruning.models import build_model
from pruning.sparsity import apply_masks, masks_from_state_dict

FORMAT = 1


def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> Path:
    """Atomically write ``model``'s state and ``meta`` (must name ``model`` and ``dataset``)."""
    for key in ("model", "dataset"):
        if key not in meta:
            raise PruningError(f"checkpoint meta lacks {key!r}")
    return save_torch_atomic({"format": FORMAT, "meta": dict(meta), "model": model.state_dict()},
                             Path(path))


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Sequential, dict]:
    """Rebuild the zoo model of a checkpoint and load its weights (and masks).

    Returns ``(model, meta)`` with the model on ``device`` / ``dtype`` in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise PruningFileError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise PruningFileError(f"{path} is not a certiprune checkpoint: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PruningFileError(f"{path} is not a certiprune checkpoint (format {FORMAT})")
    meta = state["meta"]
    model = build_model(meta["model"], dataset_info(meta["dataset"]))
    apply_masks(model, masks_from_state_dict(state["model"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else "shape mismatch"
        raise PruningFileError(
            f"{path}: weights do not fit model {meta['model']!r} on {meta['dataset']}: {first}"
        ) from None
    return model.to(device=device, dtype=dtype).eval(), meta
