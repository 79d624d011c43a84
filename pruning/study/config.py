"""The configuration of a study: frozen dataclasses read from a TOML file (stdlib ``tomllib``).

A study file has a few top-level keys (what is trained, on what) and four tables::

    name = "fmnist_mlp_standard"      # default: the file's stem; outputs go to <out>/<name>
    dataset = "fashion-mnist"
    model = "mlp2x256"
    data_dir = "/path/to/datasets"    # optional: --data-dir or $CERTIPRUNE_DATA otherwise
    eps = 0.1                         # training radius (adversarial / certified regimes)
    seed = 0
    threads = 1
    train_limit = 30000               # first N training images (omit: all)
    test_limit = 1000                 # clean / PGD accuracy on the first N test images

    [train]    regimes, epochs, rewind_epoch, batch_size, lr, optimizer, ramp_epochs, ...
    [prune]    methods, sparsities, finetune_epochs, score_epochs, rounds, ...
    [prune.schedule.<method>]   kind = "iterative", rounds = 3   (per-method schedule)
    [verify]   images, timeout, eps, compact
    [quick]    overrides for --quick (same keys as above, flattened: epochs, images, ...)

Unknown keys, wrong types and impossible values are one-line ``PruningError``s naming the file
and the key. ``StudyConfig.quick()`` applies the ``[quick]`` table (and small defaults).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from pruning.errors import PruningError

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
class ScheduleSection:
    """The schedule of one method: ``kind`` "one-shot" or "iterative" (``rounds`` rounds to
    the target sparsity of the ladder, rewinding as ``rewind``)."""

    kind: str = "one-shot"
    rounds: int = 1
    rewind: str = "rewind_lt"


@dataclasses.dataclass(frozen=True)
class PruneSection:
    """Pruning and fine-tuning (``certiprune prune``'s options). ``sparsities`` is the ladder;
    0 is the dense model itself. Methods without a ``schedules`` entry run under their default
    schedule (one-shot; iterative for imp, with ``rounds`` rounds)."""

    methods: tuple[str, ...] = ("random", "magnitude")
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.9)
    finetune_epochs: int = 2  # per round when iterative
    finetune_lr: float = 1e-3
    score_epochs: int = 2  # HYDRA / stability score learning, slim, nrs
    score_lr: float = 1e-3
    score_batches: int | None = None  # snip / taylor
    scope: str = "global"
    rounds: int = 3  # default round count of iterative methods
    stability_weight: float = 0.5
    slim_penalty: float = 1e-4
    schedules: dict[str, ScheduleSection] = dataclasses.field(default_factory=dict)

    def schedule_of(self, method: str, default_kind: str) -> ScheduleSection:
        if method in self.schedules:
            return self.schedules[method]
        if default_kind == "iterative":
            return ScheduleSection(kind="iterative", rounds=self.rounds)
        return ScheduleSection()


@dataclasses.dataclass(frozen=True)
class VerifySection:
    """Verification of the first ``images`` test images of every model at radius ``eps``
    (None: the training eps) with a per-image ``timeout`` in seconds. ``compact``: verify the
    compacted ONNX (BatchNorm folded, dead units removed; same function, fewer ReLUs)."""

    images: int = 100
    timeout: float = 30.0
    eps: float | None = None
    compact: bool = True
    pgd_steps: int = 10  # the PGD accuracy column


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    name: str
    dataset: str = "fashion-mnist"
    model: str = "mlp2x256"
    data_dir: str | None = None
    eps: float | None = None  # None: the dataset's default
    seed: int = 0
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
        values["sparsities"] = _quick_ladder(self.prune.sparsities)
        values.update(self.quick_overrides)
        top = {k: values.pop(k) for k in list(values) if k in _TOP_QUICK}
        sections = {}
        for section, cls in (("train", TrainSection), ("prune", PruneSection),
                             ("verify", VerifySection)):
            names = {f.name for f in dataclasses.fields(cls)}
            changes = {k: values.pop(k) for k in list(values) if k in names}
            if section == "prune" and "rounds" in changes:  # shorter iterative schedules too
                schedules = {m: dataclasses.replace(s, rounds=min(s.rounds, changes["rounds"]))
                             for m, s in self.prune.schedules.items()}
                changes["schedules"] = schedules
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
    "finetune_epochs": 1, "score_epochs": 1, "rounds": 2, "images": 5, "timeout": 2.0,
    "pgd_steps": 3,
}
_TOP_QUICK = {"train_limit", "test_limit", "seed", "threads"}


def _quick_ladder(ladder: tuple[float, ...]) -> tuple[float, ...]:
    """The dense model plus the middle of the ladder's nonzero sparsities."""
    nonzero = [s for s in ladder if s > 0]
    return (0.0,) + ((nonzero[len(nonzero) // 2],) if nonzero else ())


# ---------------------------------------------------------------- reading

def load_config(path: str | Path) -> StudyConfig:
    """Read and check a study file; every problem is one ``PruningError`` line."""
    path = Path(path)
    if not path.is_file():
        raise PruningError(f"study config not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PruningError(f"{path}: not valid TOML: {str(err).splitlines()[0]}") from None
    return parse_config(data, source=str(path), default_name=path.stem)


def parse_config(data: dict, source: str = "<config>", default_name: str = "study") -> StudyConfig:
    where = source
    data = dict(data)
    sections = {}
    for key, cls in (("train", TrainSection), ("verify", VerifySection)):
        sections[key] = _build(cls, _table(data.pop(key, {}), f"{where}: [{key}]"),
                               f"{where}: [{key}]")
    prune = dict(_table(data.pop("prune", {}), f"{where}: [prune]"))
    schedules = {}
    for method, table in _table(prune.pop("schedule", {}), f"{where}: [prune.schedule]").items():
        schedules[method] = _build(ScheduleSection,
                                   _table(table, f"{where}: [prune.schedule.{method}]"),
                                   f"{where}: [prune.schedule.{method}]")
    sections["prune"] = _build(PruneSection, prune, f"{where}: [prune]", schedules=schedules)
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
    allowed = set(QUICK_DEFAULTS) | {"sparsities", "methods", "regimes", "seed", "threads"}
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
    from pruning.models import MODELS
    from pruning.objectives import REGIMES
    from pruning.schedule import REWINDS, SCHEDULES
    from pruning.sparsity import SCOPES

    where = config.source
    if config.dataset not in DEFAULT_EPS:
        _bad(where, "dataset", config.dataset, DEFAULT_EPS)
    if config.model not in MODELS:
        _bad(where, "model", config.model, MODELS)
    for regime in config.train.regimes:
        if regime not in REGIMES:
            _bad(where, "train.regimes", regime, REGIMES)
    for method in config.prune.methods:
        if method not in METHOD_NAMES:
            _bad(where, "prune.methods", method, METHOD_NAMES)
    for method, schedule in config.prune.schedules.items():
        if method not in METHOD_NAMES:
            _bad(where, "prune.schedule", method, METHOD_NAMES)
        if schedule.kind not in SCHEDULES:
            _bad(where, f"prune.schedule.{method}.kind", schedule.kind, SCHEDULES)
        if schedule.rewind not in REWINDS:
            _bad(where, f"prune.schedule.{method}.rewind", schedule.rewind, REWINDS)
        if schedule.rounds < 1:
            raise PruningError(f"{where}: prune.schedule.{method}.rounds must be ≥ 1")
    if config.prune.scope not in SCOPES:
        _bad(where, "prune.scope", config.prune.scope, SCOPES)
    if not config.train.regimes or not config.prune.sparsities:
        raise PruningError(f"{where}: train.regimes and prune.sparsities must not be empty")
    for s in config.prune.sparsities:
        if not 0.0 <= s < 1.0:
            raise PruningError(f"{where}: prune.sparsities: {s} is not in [0, 1)")
    if len(set(config.prune.sparsities)) != len(config.prune.sparsities):
        raise PruningError(f"{where}: prune.sparsities repeats a value")
    if not 0 <= config.train.rewind_epoch <= config.train.epochs:
        raise PruningError(f"{where}: train.rewind_epoch {config.train.rewind_epoch} is not in "
                           f"0..{config.train.epochs} (train.epochs)")
    if config.verify.images < 1 or config.verify.timeout <= 0 or config.threads < 1:
        raise PruningError(f"{where}: verify.images and threads must be ≥ 1 and "
                           "verify.timeout > 0")
    if config.train.epochs < 1 or config.prune.rounds < 1:
        raise PruningError(f"{where}: train.epochs and prune.rounds must be ≥ 1")
    if not config.name or "/" in config.name:
        raise PruningError(f"{where}: name {config.name!r} must be a non-empty file name")


def _bad(where: str, key: str, value, choices) -> None:
    raise PruningError(f"{where}: {key}: unknown {value!r}; choose one of "
                       f"{', '.join(sorted(choices))}")


# ---------------------------------------------------------------- resuming

# Keys whose change invalidates finished stages are all but these: the ladder, the methods,
# the regimes, the number of images, threads and the data path may grow or change between runs.
_FREE_KEYS = {"threads", "data_dir", "quick_overrides"}
_FREE_SECTION_KEYS = {"train": {"regimes"}, "prune": {"methods", "sparsities", "schedules"},
                      "verify": {"images"}}


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
