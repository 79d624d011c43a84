"""What ``certiprune verify`` hands to its reader: the VNN-COMP result file (written atomically)
and the ``--json`` object. Imports nothing heavy: the error path uses it before torch loads."""
from __future__ import annotations

import math
import os
import tempfile
from typing import Optional

from .errors import InputFileError


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old content or the new, never a part
    of either: a temporary file in the same folder (same file system, unique name, so two writers
    cannot share it), flushed to disk, then ``os.replace`` over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:   # a folder that does not exist or cannot be written: the user's path
        raise InputFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _number(value) -> Optional[float]:
    """JSON has no infinities or NaN: those become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def result_json(result, model: str, spec: str, seconds: float) -> dict:
    """The ``verify --json`` object of a ``VerificationResult``: verdict, wall seconds, the
    counterexample (x, y lists; null unless sat), subdomains bounded, the reason for ``unknown``
    or ``timeout`` (null otherwise), the root bounds per region and the time of each phase."""
    counterexample = None
    if result.status == "sat" and result.counterexample is not None:
        x, y = result.counterexample
        counterexample = {"x": [float(v) for v in x.reshape(-1)], "y": [float(v) for v in y.reshape(-1)]}
    records = result.records
    roots = [records.roots[r].as_json() for r in sorted(records.roots)] if records is not None else []
    return {
        "verdict": result.status,
        "seconds": round(seconds, 4),
        "model": model,
        "spec": spec,
        "counterexample": counterexample,
        "subdomains": records.count if records is not None else 0,
        "reason": result.details.get("reason") if result.status in ("unknown", "timeout") else None,
        "root_bounds": roots,
        "phases": {k: round(v, 4) for k, v in (records.phases if records is not None else {}).items()},
    }
