"""The one atomic writer of the pruning layer: write to ``<name>.tmp`` beside the target, then
``os.replace`` it over the target, so a reader (or a resumed run) sees the old file or the new
one, never half of one. Every stage file of a study, every checkpoint and every summary goes
through here; the presence of a file is what marks a stage as done."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def replace_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path`` (parents created), then move it
    over ``path``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return replace_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, value, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=indent) + "\n")


def save_torch_atomic(obj, path: Path) -> Path:
    import torch

    return replace_atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: Path):
    """The JSON value of ``path``, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
