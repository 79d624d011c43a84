"""The configuration of a study: frozen dataclasses read from a TOML file (stdlib ``tomllib``).

A study file has a few top-level keys (what is trained, on what) and four tables::

    name = "paper_fmnist"             # default: the file's stem; outputs go to <out>/<name>
    dataset = "fashion-mnist"
    model = "cifar_model_deep"
    data_dir = "/path/to/datasets"    # optional: --data-dir or $CERTIPRUNE_DATA otherwise
    eps = 0.1                         # training radius (adversarial / certified regimes)
    seeds = [0, 1, 2]                 # one whole study per seed (mean ± sd over them)
    threads = 1
    train_limit = 30000               # first N training images (omit: all)
    test_limit = 1000                 # clean / PGD accuracy on the first N test images

    [train]    regimes, epochs, rewind_epoch, batch_size, lr, optimizer, ramp_epochs, ...
    [prune]    methods, layers, scope, the two ladders, rewind, finetune_epochs, control, ...
    [verify]   images, timeout, retry_timeout, eps, compact, rounds, other_seed_rounds
    [quick]    overrides for --quick (same keys as above, flattened: epochs, images, ...)

Every default follows the paper (Li et al., TMLR 2023; VITA-Group/CertifiedPruning): conv
layers only, one global threshold, unstructured methods 20 % × 16 rounds, channel methods
11 % × 12 rounds, rewinding the whole state to the epoch-1 state after every round, every
round verified.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from pruning.errors import PruningError, PruningFileError

DEFAULT_EPS = {"mnist": 0.1, "fashion-mnist": 0.1, "cifar10": 2 / 255}


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Pre-training of one dense model per regime (``certiprune train``'s options)."""

    regimes: tuple[str, ...] = ("standard",)
    epochs: int = 10
    rewind_epoch: int = 1  # weights saved after this epoch: IMP rewinds to them
    batch_size: int = 128
    lr: float | None = None  # None: the regime's default (pruning.train.REGIME_TRAINING)
    optimizer: str | None = None
    ramp_epochs: float | None = None  # crown-ibp eps ramp; None: half the epochs
    grad_align_weight: float = 0.2  # fgsm


@dataclasses.dataclass(frozen=True)
class PruneSection:
    """Pruning: every method runs its ladder (iterative, ``rewind`` after every round), one
    stage file per round. ``layers``: "conv" (the paper) or "all"; ``scope``: one "global"
    threshold (the paper) or one per "layer" (methods with a fixed one keep it: hydra and
    l1-channel per layer). ``finetune_epochs``: retraining per round (None: ``train.epochs``,
    the paper's full retraining) with the regime's optimiser and, after a rewind, the lr at the
    rewind epoch's position. ``control``: also train, per dense model, a control that is
    fine-tuned round by round for exactly the epochs a pruned model gets (no pruning)."""

    methods: tuple[str, ...] = ("random", "imp", "imp-nrs", "snip", "taylor", "hydra",
                                "slim", "l1-channel", "refill", "nrs")
    layers: str = "conv"
    scope: str = "global"
    unstructured_rate: float = 0.2
    unstructured_rounds: int = 16
    channel_rate: float = 0.11
    channel_rounds: int = 12
    rewind: str = "rewind_lt"
    finetune_epochs: int | None = None
    score_epochs: int = 1  # HYDRA / stability score learning, slim / nrs extra training
    score_lr: float = 1e-3
    score_batches: int | None = 1  # snip / taylor: the paper scores one mini-batch
    stability_weight: float = 0.5
    slim_penalty: float = 1e-4
    rs_weight: float | None = None  # NRS weight (None: 0.01, 0.001 under crown-ibp)
    control: bool = True

    def ladder(self, structured: bool):
        from pruning.schedule import Ladder

        if structured:
            return Ladder(self.channel_rate, self.channel_rounds)
        return Ladder(self.unstructured_rate, self.unstructured_rounds)


@dataclasses.dataclass(frozen=True)
class VerifySection:
    """Verification of the first ``images`` test images of every model at radius ``eps``
    (None: the training eps) with a per-image ``timeout`` in seconds. ``compact``: verify the
    compacted ONNX (BatchNorm folded, dead units removed; same function, fewer ReLUs)."""

    images: int = 200
    timeout: float = 30.0
    retry_timeout: float = 60.0  # second pass over the first pass's timeouts (≥ 60 s)
    eps: float | None = None
    compact: bool = True
    pgd_steps: int = 10  # the PGD accuracy column
    rounds: tuple[int, ...] | None = None  # rounds verified for the first seed (None: all)
    other_seed_rounds: tuple[int, ...] | None = None  # for the other seeds (None: as rounds)

    def rounds_for(self, seed_index: int, n_rounds: int) -> list[int]:
        """The rounds (1..n_rounds) whose models are measured and verified for a seed."""
        chosen = self.rounds if seed_index == 0 or self.other_seed_rounds is None \
            else self.other_seed_rounds
        return [r for r in range(1, n_rounds + 1) if chosen is None or r in chosen]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    name: str
    dataset: str = "fashion-mnist"
    model: str = "mlp2x256"
    data_dir: str | None = None
    eps: float | None = None  # None: the dataset's default
    seeds: tuple[int, ...] = (0,)
    threads: int = 1
    train_limit: int | None = None
    test_limit: int | None = 1000
    train: TrainSection = TrainSection()
    prune: PruneSection = PruneSection()
    verify: VerifySection = VerifySection()
    quick_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<config>"

    @property
    def train_eps(self) -> float:
        return self.eps if self.eps is not None else DEFAULT_EPS[self.dataset]

    @property
    def verify_eps(self) -> float:
        return self.verify.eps if self.verify.eps is not None else self.train_eps

    def quick(self) -> "StudyConfig":
        """The ``--quick`` variant: small data, one epoch, few images, short ladder; then the
        file's ``[quick]`` table on top. Its outputs go to ``<name>-quick``."""
        values = dict(QUICK_DEFAULTS)
        values.update(self.quick_overrides)
        top = {k: values.pop(k) for k in list(values) if k in _TOP_QUICK}
        sections = {}
        for section, cls in (("train", TrainSection), ("prune", PruneSection),
                             ("verify", VerifySection)):
            names = {f.name for f in dataclasses.fields(cls)}
            changes = {k: values.pop(k) for k in list(values) if k in names}
            sections[section] = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, name=self.name + "-quick", quick_overrides={},
                                   **top, **sections)

    def as_dict(self) -> dict:
        """JSON-able form (written to ``config.json`` of the study folder)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


# --quick: about a minute for an MLP; the [quick] table of a file may change any of these.
QUICK_DEFAULTS: dict[str, Any] = {
    "train_limit": 1000, "test_limit": 200, "epochs": 1, "rewind_epoch": 1,
    "finetune_epochs": 1, "score_epochs": 1, "unstructured_rounds": 2, "channel_rounds": 2,
    "images": 5, "timeout": 2.0, "retry_timeout": 4.0, "pgd_steps": 3, "seeds": [0],
}
_TOP_QUICK = {"train_limit", "test_limit", "seeds", "threads"}


# ---------------------------------------------------------------- reading

def load_config(path: str | Path) -> StudyConfig:
    """Read and check a study file; every problem is one ``PruningError`` line."""
    path = Path(path)
    if not path.is_file():
        raise PruningFileError(f"study config not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PruningFileError(f"{path}: not valid TOML: {str(err).splitlines()[0]}") from None
    return parse_config(data, source=str(path), default_name=path.stem)


def parse_config(data: dict, source: str = "<config>", default_name: str = "study") -> StudyConfig:
    where = source
    data = dict(data)
    sections = {}
    for key, cls in (("train", TrainSection), ("verify", VerifySection)):
        sections[key] = _build(cls, _table(data.pop(key, {}), f"{where}: [{key}]"),
                               f"{where}: [{key}]")
    prune = dict(_table(data.pop("prune", {}), f"{where}: [prune]"))
    sections["prune"] = _build(PruneSection, prune, f"{where}: [prune]")
    quick = _table(data.pop("quick", {}), f"{where}: [quick]")
    top = _build(StudyConfig, {"name": default_name, **data}, where,
                 exclude=("train", "prune", "verify", "quick_overrides", "source"),
                 **sections, source=source)
    _check_quick(quick, where)
    config = dataclasses.replace(top, quick_overrides=dict(quick))
    check_config(config)
    return config


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise PruningError(f"{where} must be a table, got {type(value).__name__}")
    return value


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_value(name: str, annotation: str, value, where: str):
    """``value`` converted to the field's type (lists -> tuples), or a one-line error."""
    base = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return None
    if base.startswith("tuple["):
        inner = base[len("tuple["):-1].split(",")[0].strip()
        if not isinstance(value, list) or not all(
                isinstance(v, _TYPES[inner]) and not isinstance(v, bool) or
                (inner == "bool" and isinstance(v, bool)) for v in value):
            raise PruningError(f"{where}: {name} must be a list of {inner}s, got {value!r}")
        return tuple(float(v) if inner == "float" else v for v in value)
    kinds = _TYPES.get(base)
    if kinds is None:
        raise PruningError(f"{where}: {name} cannot be set here")
    if not isinstance(value, kinds) or (base != "bool" and isinstance(value, bool)):
        raise PruningError(f"{where}: {name} must be a {base}, got {value!r}")
    return float(value) if base == "float" else value


def _build(cls, values: dict, where: str, exclude: tuple[str, ...] = (), **fixed):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settable = {n for n in fields if n not in exclude and n not in fixed}
    kwargs = dict(fixed)
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in settable:
            raise PruningError(f"{where}: unknown key {key!r}; known: "
                               f"{', '.join(sorted(settable))}")
        kwargs[name] = _check_value(key, str(fields[name].type), value, where)
    try:
        return cls(**kwargs)
    except PruningError as err:
        raise PruningError(f"{where}: {err}") from None


def _check_quick(quick: dict, where: str) -> None:
    known = {}
    for cls in (TrainSection, PruneSection, VerifySection, StudyConfig):
        known.update({f.name: f for f in dataclasses.fields(cls)})
    allowed = set(QUICK_DEFAULTS) | {"methods", "regimes", "threads", "rounds",
                                     "other_seed_rounds"}
    for key, value in quick.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise PruningError(f"{where}: [quick]: unknown key {key!r}; known: "
                               f"{', '.join(sorted(allowed))}")
        quick[name] = _check_value(key, str(known[name].type), value, f"{where}: [quick]")
        if name != key:
            del quick[key]


def check_config(config: StudyConfig) -> None:
    """Names and ranges that can be known before any work starts."""
    from pruning.methods import METHOD_NAMES
    from pruning.models import LAYER_SCOPES, MODELS
    from pruning.objectives import REGIMES
    from pruning.schedule import REWINDS
    from pruning.sparsity import SCOPES

    where, prune = config.source, config.prune
    if config.dataset not in DEFAULT_EPS:
        _bad(where, "dataset", config.dataset, DEFAULT_EPS)
    if config.model not in MODELS:
        _bad(where, "model", config.model, MODELS)
    for regime in config.train.regimes:
        if regime not in REGIMES:
            _bad(where, "train.regimes", regime, REGIMES)
    for method in prune.methods:
        if method not in METHOD_NAMES or method.startswith("control"):
            _bad(where, "prune.methods", method,
                 [m for m in METHOD_NAMES if not m.startswith("control")])
    if prune.rewind not in REWINDS:
        _bad(where, "prune.rewind", prune.rewind, REWINDS)
    if prune.scope not in SCOPES:
        _bad(where, "prune.scope", prune.scope, SCOPES)
    if prune.layers not in LAYER_SCOPES:
        _bad(where, "prune.layers", prune.layers, LAYER_SCOPES)
    for kind in ("unstructured", "channel"):
        rate, rounds = getattr(prune, f"{kind}_rate"), getattr(prune, f"{kind}_rounds")
        if not 0 < rate < 1 or rounds < 1:
            raise PruningError(f"{where}: prune.{kind}_rate must be in (0, 1) and "
                               f"prune.{kind}_rounds ≥ 1")
    if not config.train.regimes or not config.seeds:
        raise PruningError(f"{where}: train.regimes and seeds must not be empty")
    if len(set(config.seeds)) != len(config.seeds):
        raise PruningError(f"{where}: seeds repeats a value")
    if not 0 <= config.train.rewind_epoch <= config.train.epochs:
        raise PruningError(f"{where}: train.rewind_epoch {config.train.rewind_epoch} is not in "
                           f"0..{config.train.epochs} (train.epochs)")
    verify = config.verify
    if verify.images < 1 or verify.timeout <= 0 or config.threads < 1:
        raise PruningError(f"{where}: verify.images and threads must be ≥ 1 and "
                           "verify.timeout > 0")
    if verify.retry_timeout < verify.timeout:
        raise PruningError(f"{where}: verify.retry_timeout ({verify.retry_timeout:g} s) must "
                           f"be ≥ verify.timeout ({verify.timeout:g} s)")
    if config.train.epochs < 1 or (prune.finetune_epochs is not None
                                   and prune.finetune_epochs < 1):
        raise PruningError(f"{where}: train.epochs and prune.finetune_epochs must be ≥ 1")
    if not config.name or "/" in config.name:
        raise PruningError(f"{where}: name {config.name!r} must be a non-empty file name")


def _bad(where: str, key: str, value, choices) -> None:
    raise PruningError(f"{where}: {key}: unknown {value!r}; choose one of "
                       f"{', '.join(sorted(choices))}")


# ---------------------------------------------------------------- resuming

# Keys whose change invalidates finished stages are all but these: the methods, seeds, regimes,
# the images and rounds verified, threads and the data path may grow or change between runs
# (a longer retry budget only re-verifies what is still a timeout).
_FREE_KEYS = {"threads", "data_dir", "quick_overrides", "seeds"}
_FREE_SECTION_KEYS = {"train": {"regimes"}, "prune": {"methods", "control"},
                      "verify": {"images", "rounds", "other_seed_rounds", "retry_timeout"}}


def changed_keys(stored: dict, current: dict) -> set[str]:
    """The dotted keys (``verify.timeout``) in which two ``StudyConfig.as_dict()`` forms differ
    in a way that invalidates finished work."""
    before, now = (_fingerprint(json.loads(json.dumps(c))) for c in (stored, current))
    return _diff(before, now)


def _fingerprint(values: dict) -> dict:
    for key in _FREE_KEYS:
        values.pop(key, None)
    for section, keys in _FREE_SECTION_KEYS.items():
        for key in keys:
            values.get(section, {}).pop(key, None)
    return values


def _diff(before: dict, now: dict, prefix: str = "") -> set[str]:
    changed = set()
    for key in set(before) | set(now):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed |= _diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a) != json.dumps(b):
            changed.add(prefix + key)
    return changed
