"""VNN-COMP instance lists and reference answers: reading ``*instances.csv`` files.

An instances file has one row per instance, ``onnx,vnnlib,timeout`` without a header, paths
relative to a base folder (by default the CSV's own folder, as in the VNN-COMP repository).
Two layouts are understood:

* a suite's own ``<benchmark>_instances.csv``: the benchmark is named by the file name, or by
  the folder when the file is just ``instances.csv``;
* a mixed list (``benchmarks/quick_suite.csv``) whose paths start with the benchmark's folder,
  ``acasxu/ACASXU_run2a_1_1_batch_2000.onnx``, relative to a suite root given on the command
  line. The benchmark is the first path component and the rest is the path inside the suite.

Instances are keyed by ``(benchmark, onnx, vnnlib)`` with paths relative to the suite folder,
the key ``REFERENCE.csv`` and the result CSVs of ``benchmarks.bench`` use.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Instance:
    benchmark: str
    onnx: str          # path relative to the suite folder, as in REFERENCE.csv
    vnnlib: str
    timeout: float     # seconds, as the instances file gives it
    onnx_path: str     # path to open
    vnnlib_path: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.benchmark, self.onnx, self.vnnlib)


def _benchmark_from_file(csv_path: Path) -> Optional[str]:
    stem = csv_path.name[:-len(".csv")] if csv_path.name.endswith(".csv") else csv_path.name
    if stem.endswith("_instances"):
        return stem[:-len("_instances")]
    if stem == "instances":
        return csv_path.resolve().parent.name
    return None


def read_instances(csv_path: str | os.PathLike, root: Optional[str | os.PathLike] = None) -> list[Instance]:
    """All instances of an instances file, in file order.

    ``root``: base folder of the paths (default: the CSV's folder). For a file not named
    ``*instances.csv`` the benchmark is the first component of each onnx path.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    named = _benchmark_from_file(csv_path)
    instances = []
    with open(csv_path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if len(row) < 3:
                raise ValueError(f"{csv_path}:{lineno}: expected onnx,vnnlib,timeout; got {row}")
            onnx, vnnlib, timeout = row[0], row[1], float(row[2])
            if named is not None:
                benchmark, onnx_rel, vnnlib_rel = named, onnx, vnnlib
            else:
                benchmark, _, onnx_rel = onnx.partition("/")
                prefix, _, vnnlib_rel = vnnlib.partition("/")
                if not onnx_rel or prefix != benchmark:
                    raise ValueError(f"{csv_path}:{lineno}: paths of a mixed list must start with the same "
                                     f"benchmark folder, got {onnx!r} and {vnnlib!r}")
            instances.append(Instance(benchmark, onnx_rel, vnnlib_rel, timeout,
                                      str(base / onnx), str(base / vnnlib)))
    return instances


def read_reference(path: str | os.PathLike) -> dict[tuple[str, str, str], str]:
    """REFERENCE.csv (benchmark,onnx,vnnlib,answer,...) -> {key: 'sat' | 'unsat' | 'unknown'}."""
    reference = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            reference[(row["benchmark"], row["onnx"], row["vnnlib"])] = row["answer"].strip()
    return reference


def add_pair_arguments(parser, timeout: float = 150.0) -> None:
    """The arguments of the in-process comparisons (``branching_ab``, ``search_costs``): instances
    as ONNX:VNNLIB pairs relative to ``--root``, ``--timeout`` per verification, ``--threads``."""
    parser.add_argument("instances", nargs="+", help="ONNX:VNNLIB pairs, relative to --root")
    parser.add_argument("--root", default=".", help="folder the instance paths are relative to")
    parser.add_argument("--timeout", type=float, default=timeout)
    parser.add_argument("--threads", type=int, default=1)


def load_pairs(args):
    """Sets torch's threads to ``args.threads``, then yields, per pair of ``args.instances``:
    (onnx, vnnlib, BoundedModel, Property), the model loaded once for all of its runs."""
    import torch
    from verifier import BoundedModel
    from verifier.io.vnnlib import load_vnnlib
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    for pair in args.instances:
        onnx, vnnlib = pair.split(":")
        model = BoundedModel(str(root / onnx))
        graph = model.graph()
        prop = load_vnnlib(str(root / vnnlib), n_inputs=graph.nodes[0].numel,
                           n_outputs=graph.nodes[graph.output].numel)
        yield onnx, vnnlib, model, prop
