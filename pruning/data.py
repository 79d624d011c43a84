"""Datasets read from the standard on-disk layouts, never downloaded.

Layouts (``root`` from ``--data-dir`` or the environment variable ``CERTIPRUNE_DATA``):

- MNIST / Fashion-MNIST: torchvision's ``<root>/<MNIST|FashionMNIST>/raw/`` with the four IDX
  files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzip-compressed (``.gz``) or not.
- CIFAR-10: the python batches ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.

Images are returned as float tensors in [0, 1] of shape ``(N, C, H, W)``; normalisation is part
of the model (``pruning.models.Normalize``), so the valid input box of every dataset is [0, 1]
and VNN-LIB specifications are written in pixel space.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from pruning.errors import PruningError, PruningFileError

DATA_ENV = "CERTIPRUNE_DATA"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: shapes, classes and input statistics."""

    name: str
    folder: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    n_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]


DATASETS = {
    "mnist": DatasetInfo("mnist", "MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "FashionMNIST", (1, 28, 28), 10, (0.2860,), (0.3530,)
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        "cifar-10-batches-py",
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
}


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A labelled image set held in memory.

    images: (N, C, H, W) float in [0, 1]; labels: (N,) int64.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "ImageData":
        """The first ``n`` examples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return ImageData(self.images[:n], self.labels[:n])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ImageData":
        return ImageData(self.images.to(device=device, dtype=dtype), self.labels.to(device))


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise PruningError(
            f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}"
        ) from None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The dataset root: the flag if given, else ``$CERTIPRUNE_DATA``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
    if not data_dir:
        raise PruningError(f"no dataset root: pass --data-dir or set {DATA_ENV}")
    return Path(data_dir)


def load_dataset(name: str, root: str | os.PathLike, split: str) -> ImageData:
    """Read ``split`` ("train" or "test") of dataset ``name`` from ``root``."""
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise PruningError(f"unknown split {split!r}; choose 'train' or 'test'")
    if name == "cifar10":
        return _load_cifar10(Path(root) / info.folder, split)
    return _load_idx_pair(Path(root) / info.folder / "raw", split)


def _find_idx(raw: Path, stem: str) -> Path:
    for candidate in (raw / f"{stem}.gz", raw / stem):
        if candidate.is_file():
            return candidate
    raise PruningFileError(f"dataset file missing: expected {raw / stem}[.gz]")


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise PruningFileError(f"cannot read IDX file {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PruningFileError(f"{path} is not an IDX file of unsigned bytes")
    n_dims = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims)
    if body.size != int(np.prod(dims)):
        raise PruningFileError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (used to make test slices)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _load_idx_pair(raw: Path, split: str) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(raw, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(raw, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise PruningFileError(f"{raw}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageData(
        torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )


def _load_cifar10(folder: Path, split: str) -> ImageData:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise PruningFileError(f"dataset file missing: expected {path}")
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return ImageData(
        torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0),
        torch.from_numpy(np.concatenate(labels)),
    )


def batches(
    data: ImageData, batch_size: int, generator: torch.Generator | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches ``(x: (b, C, H, W), y: (b,))``, shuffled by ``generator`` when given."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [
        (data.images[idx], data.labels[idx])
        for idx in (order[i : i + batch_size] for i in range(0, n, batch_size))
    ]
