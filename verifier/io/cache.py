"""Converted ONNX models cached on disk, so a fresh ``certiprune verify`` skips the conversion.

Loading an ONNX file costs, before any bound, the import of onnx2torch and onnx (0.8-1.2 s on
the 2-core machine) and the conversion to a bound graph (0.01-0.4 s); a cached bound graph
unpickles in 0.02-0.06 s and needs neither package. VNN-COMP's untimed ``prepare_instance.sh``
fills the cache, the timed ``run_instance.sh`` reads it (RESULTS.md has the measured saving).

An entry is keyed by the SHA-256 of the ONNX file's bytes, the device, the dtype and a
fingerprint of the verifier's own source, so a changed model file or a changed converter never
meets a stale graph. An unreadable or foreign entry counts as a miss (the model is converted
again and the entry rewritten); entries are written to a temporary file and renamed, so a
reader never sees half of one. The cache holds pickles: point it only at a folder of your own.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..graph import BoundGraph
from .onnx import OnnxModel

ENV_CACHE_DIR = "CERTIPRUNE_CACHE_DIR"
_FORMAT = 1


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint() -> str:
    """SHA-256 over the verifier package's Python sources (names and bytes), first 16 hex digits:
    any change to the converter, the ops or the graph invalidates every cached graph."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike, onnx_path: str, device: torch.device, dtype: torch.dtype) -> Path:
    """Where the entry of this model, device and dtype lives under ``cache_dir``."""
    key = hashlib.sha256(f"{file_digest(onnx_path)} {device} {dtype} {source_fingerprint()}".encode()).hexdigest()
    return Path(cache_dir) / f"{key[:32]}.pkl"


def _read_entry(path: Path, onnx_path: str) -> Optional[tuple[OnnxModel, BoundGraph]]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception:   # truncated, foreign or from another torch: convert again
        return None
    if not (isinstance(entry, dict) and entry.get("format") == _FORMAT and isinstance(entry.get("graph"), BoundGraph)):
        return None
    meta = entry["onnx"]
    return OnnxModel(onnx_path, None, meta["input_name"], tuple(meta["input_layout"]), meta["batched"]), entry["graph"]


def _write_entry(path: Path, onnx_model: OnnxModel, graph: BoundGraph) -> None:
    import cloudpickle   # the graph holds closures of the converter, which pickle cannot write
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"format": _FORMAT, "graph": graph,
             "onnx": {"input_name": onnx_model.input_name, "input_layout": list(onnx_model.input_layout),
                      "batched": onnx_model.batched}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            cloudpickle.dump(entry, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_onnx_graph(onnx_path: str, device: torch.device, dtype: torch.dtype,
                    cache_dir: Optional[str | os.PathLike] = None) -> tuple[OnnxModel, BoundGraph, bool]:
    """The ONNX model's metadata and simplified bound graph, and whether they came from the cache.

    Without ``cache_dir`` this is ``load_onnx`` + ``onnx_bound_graph``. With one, a hit skips
    both (the returned OnnxModel then has ``graph_module=None``: the onnx2torch module is not
    kept); a miss converts and stores the entry. An entry that cannot be written (read-only
    folder, full disk) only costs the saving."""
    from .onnx import load_onnx, onnx_bound_graph
    entry_path = None
    if cache_dir is not None and os.path.isfile(onnx_path):
        entry_path = cache_path(cache_dir, onnx_path, device, dtype)
        hit = _read_entry(entry_path, onnx_path)
        if hit is not None:
            return hit[0], hit[1], True
    onnx_model = load_onnx(onnx_path)
    graph = onnx_bound_graph(onnx_model, device, dtype)
    if entry_path is not None:
        try:
            _write_entry(entry_path, onnx_model, graph)
        except Exception:   # a cache that cannot be written only costs the saving
            pass
    return onnx_model, graph, False
