"""Verification of one model's test images in-process, as ``certiprune verify`` would."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pruning.atomic import replace_atomic
from pruning.data import DatasetInfo, ImageData


class ImageVerifier:
    """The ONNX model at ``onnx_path`` (and its PyTorch twin ``torch_model``, for the predicted
    labels) verified image by image at radius ``eps``."""

    def __init__(self, onnx_path: Path, torch_model, info: DatasetInfo, dataset: str,
                 eps: float):
        from verifier import BoundedModel

        self.onnx_path, self.info, self.dataset, self.eps = Path(onnx_path), info, dataset, eps
        self.bounded = BoundedModel(str(onnx_path), device="cpu", dtype=torch.float32)
        graph = self.bounded.graph()
        self.n_in, self.n_out = graph.nodes[0].numel, graph.nodes[graph.output].numel
        self.torch_model = torch_model
        self._predicted = None

    def predicted(self, images: ImageData) -> torch.Tensor:
        if self._predicted is None:
            with torch.no_grad():
                self._predicted = self.torch_model(images.images).argmax(1)
        return self._predicted

    def verify(self, images: ImageData, index: int, timeout: float, stats_path: Path) -> dict:
        """The verdict record of image ``index`` (images: (N, C, H, W) with labels); its
        ``--stats`` records go to ``stats_path``."""
        from pruning.export import vnnlib_robustness
        from verifier.io.vnnlib import parse_vnnlib
        from verifier.verify import VerifyConfig, verify

        label = int(images.labels[index])
        predicted = int(self.predicted(images)[index])
        record = {"image": index, "label": label, "predicted": predicted, "eps": self.eps,
                  "timeout": timeout}
        if predicted != label:
            return {**record, "verdict": "misclassified", "seconds": 0.0, "subdomains": 0}
        text = vnnlib_robustness(images.images[index], label, self.eps, self.info.n_classes,
                                 comment=f"{self.dataset} test image {index}")
        spec_name = f"img{index}_eps{self.eps:g}.vnnlib"
        prop = parse_vnnlib(text, spec_name, self.n_in, self.n_out)
        config = VerifyConfig(timeout=timeout)
        try:
            result = verify(self.bounded, prop, config)
        except Exception as err:  # noqa: BLE001 - one image must not end a long run
            return {**record, "verdict": "error", "seconds": None, "subdomains": 0,
                    "error": f"{type(err).__name__}: {err}"}
        return {**record, **self._stats(prop, result, config, spec_name, stats_path)}

    def _stats(self, prop, result, config, spec_name: str, path: Path) -> dict:
        """Complete the root records (after the verdict, untimed, as ``verify --stats``),
        write them atomically to ``path``; the image's summary fields, with the root's
        relaxation gap (attack margin − certified lower bound) per method."""
        from verifier.verify import complete_root_records

        records = result.records
        roots, gaps, per_layer = {}, {}, {}
        if records is not None:
            complete_root_records(self.bounded, prop, records, config)
            replace_atomic(path, lambda tmp: records.write(
                str(tmp), {"model": str(self.onnx_path), "spec": spec_name,
                           "result": result.status}, seconds=result.seconds))
            roots = {method: sum(sum(r.unstable.get(method, [])) for r in records.roots.values())
                     for method in ("ibp", "crown", "alpha")}
            first = next(iter(records.roots.values()), None)
            per_layer = {m: list(first.unstable.get(m, [])) for m in ("ibp", "crown", "alpha")} \
                if first is not None else {}
            gaps = root_gaps(records)
        return {"verdict": result.status, "seconds": result.seconds,
                "subdomains": records.count if records is not None else 0,
                "max_depth": records.max_depth() if records is not None else 0,
                "root_unstable": roots, "root_unstable_per_layer": per_layer,
                "root_gap": gaps}


def root_gaps(records) -> dict:
    """Per bound method, the smallest root gap ``attack − lower`` over the input regions
    (None where a value is missing)."""
    gaps = {}
    for method in ("ibp", "crown", "alpha"):
        values = []
        for root in records.roots.values():
            attack, lower = getattr(root, "attack", None), getattr(root, method, None)
            if attack is not None and lower is not None:
                gap = float(attack) - float(lower)
                if math.isfinite(gap):
                    values.append(gap)
        gaps[method] = min(values) if values else None
    return gaps
