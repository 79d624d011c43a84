"""The stages of a study, each one callable alone and resumable through its stage file:

- ``train_base(regime, seed, base)``: a dense model (``pruning.recipes.train_dense``);
- ``prune_round(job)``: round ``job.round`` of a method's ladder or of a control
  (``pruning.recipes.prune_checkpoint`` with ``stop_after``; needs the previous round's file);
- ``measure(job)``: clean / PGD accuracy, sparsity, unstable ReLUs per layer (``metrics.json``);
- ``export(job)``: compacted ONNX (``model.onnx``);
- ``verify(job)``: the first N test images at ``verify.timeout`` (``verify/img<i>.json``, with
  the ``verify --stats`` records in ``img<i>.jsonl``);
- ``reverify(job)``: the first pass's timeouts again at ``verify.retry_timeout``.

``Study.stages()`` lists them in a valid order with their dependencies (for a scheduler such as
Dask); ``Study.run()`` runs them in that order in this process. The file layout is
``pruning.study.jobs.Layout``'s. Verification is ``verifier.verify.verify`` on a
``BoundedModel`` of the exported ONNX file and the VNN-LIB property of
``pruning.export.vnnlib_robustness``, exactly what ``certiprune verify model.onnx img<i>.vnnlib
--timeout T --stats F`` does without a process per image. Misclassified images are recorded as
``misclassified`` and count as not certified.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from pruning.atomic import read_json, replace_atomic, write_json_atomic
from pruning.checkpoint import load_checkpoint
from pruning.data import ImageData, dataset_info, load_dataset, resolve_data_dir
from pruning.errors import PruningError
from pruning.study.config import StudyConfig, changed_keys
from pruning.study.jobs import CONTROLS, Layout, ModelJob, base_of, is_control
from pruning.study.progress import Progress

VERDICTS = ("unsat", "sat", "timeout", "unknown", "error", "misclassified")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One unit of work: ``kind`` (train, prune, measure, export, verify, reverify), its
    subject (``job``; a train stage's job is the base at round 0) and the names of the stages
    it needs."""

    kind: str
    job: ModelJob
    needs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.job.key}"


class Study:
    """Runs (or resumes) a study. ``work`` counts the stages that did work in this process."""

    def __init__(self, config: StudyConfig, out: Path, data_dir: str | None = None,
                 log_stream=sys.stderr):
        self.config = config
        self.root = Path(out) / config.name
        self.layout = Layout(self.root)
        self.data_dir = data_dir if data_dir is not None else config.data_dir
        self.work = dict.fromkeys(("train", "prune", "measure", "export", "verify",
                                   "reverify"), 0)
        self.progress = Progress(config.name, 0, log_stream)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._data: tuple[ImageData, ImageData] | None = None
        self.info = dataset_info(config.dataset)

    # ---------------------------------------------------------------- the plan
    def tracks(self) -> list[tuple[str, int]]:
        """(track name, rounds) for the methods and, with ``prune.control``, each base's
        control (as many rounds as the longest ladder on that base)."""
        from pruning.methods import get_method

        prune, tracks, longest = self.config.prune, [], {}
        for method in prune.methods:
            rounds = prune.ladder(get_method(method).structured).rounds
            tracks.append((method, rounds))
            base = base_of(method)
            longest[base] = max(longest.get(base, 0), rounds)
        if prune.control:
            tracks += [(CONTROLS[base], rounds) for base, rounds in longest.items()]
        return tracks

    def bases(self) -> list[str]:
        return sorted({base_of(method) for method, _ in self.tracks()} | {"dense"})

    def seed_index(self, seed: int) -> int:
        return self.config.seeds.index(seed)

    def verified_rounds(self, seed: int, rounds: int) -> list[int]:
        return self.config.verify.rounds_for(self.seed_index(seed), rounds)

    def jobs(self) -> list[ModelJob]:
        """Every evaluated model: each base (round 0), each verified round of each track."""
        jobs = []
        for seed in self.config.seeds:
            for regime in self.config.train.regimes:
                jobs += [ModelJob(regime, seed, base) for base in self.bases()]
                for method, rounds in self.tracks():
                    jobs += [ModelJob(regime, seed, method, r)
                             for r in self.verified_rounds(seed, rounds)]
        return jobs

    def stages(self) -> list[Stage]:
        """All stages in an order that respects ``needs``: per seed and regime, the bases,
        then round by round every track (so curves grow for all methods together)."""
        stages: list[Stage] = []

        def add_eval(job: ModelJob, built: str) -> None:
            export = Stage("export", job, (built,))
            verify = Stage("verify", job, (export.name,))
            stages.extend([Stage("measure", job, (built,)), export, verify,
                           Stage("reverify", job, (verify.name,))])

        for seed in self.config.seeds:
            for regime in self.config.train.regimes:
                for base in self.bases():
                    train = Stage("train", ModelJob(regime, seed, base))
                    stages.append(train)
                    add_eval(train.job, train.name)
                tracks = self.tracks()
                needed = {m: max(self.verified_rounds(seed, n), default=0) for m, n in tracks}
                for r in range(1, max(needed.values(), default=0) + 1):
                    for method, _ in tracks:
                        if r > needed[method]:
                            continue
                        job = ModelJob(regime, seed, method, r)
                        before = (f"prune:{dataclasses.replace(job, round=r - 1).key}" if r > 1
                                  else f"train:{ModelJob(regime, seed, base_of(method)).key}")
                        prune = Stage("prune", job, (before,))
                        stages.append(prune)
                        if r in self.verified_rounds(seed, dict(tracks)[method]):
                            add_eval(job, prune.name)
        return stages

    def run_stage(self, stage: Stage) -> bool | None:
        """Run one stage (True: did work, None: already done, False: cannot be done)."""
        if stage.kind == "train":
            return self.train_base(stage.job.regime, stage.job.seed, stage.job.method)
        if stage.kind == "prune":
            return self.prune_round(stage.job)
        if self._unbuildable(stage.job):
            return False
        return getattr(self, stage.kind)(stage.job)

    # ---------------------------------------------------------------- plumbing
    def data(self) -> tuple[ImageData, ImageData]:
        """(training images, test images): the first ``train_limit`` / enough test images for
        the accuracy columns and verification."""
        if self._data is None:
            root = resolve_data_dir(self.data_dir)
            try:
                train = load_dataset(self.config.dataset, root, "train")
                test = load_dataset(self.config.dataset, root, "test")
            except PruningError as err:
                raise type(err)(f"{err} (dataset {self.config.dataset} under {root}; see "
                                   "benchmarks/STUDY.md for what each config needs)") from None
            n_test = max(self.config.test_limit or len(test), self.config.verify.images)
            self._data = (train.head(self.config.train_limit).to(self.device, self.dtype),
                          test.head(n_test).to(self.device, self.dtype))
        return self._data

    def eval_data(self) -> ImageData:
        return self.data()[1].head(self.config.test_limit)

    def verify_data(self) -> ImageData:
        return self.data()[1].head(self.config.verify.images)

    def attack(self, verification: bool = False):
        from pruning.objectives import AttackConfig

        eps = self.config.verify_eps if verification else self.config.train_eps
        return AttackConfig(eps=eps, steps=self.config.verify.pgd_steps)

    def _record(self, stage: str) -> None:
        with open(self.root / "stages.log", "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {stage}\n")

    def _did(self, kind: str, what: str) -> bool:
        self.work[kind] += 1
        self._record(f"{kind} {what}")
        return True

    def _unbuildable(self, job: ModelJob) -> bool:
        folder = (self.layout.base_dir(job.regime, job.seed, job.method) if job.round == 0
                  else self.layout.rounds_dir(job))
        return (folder / "error.json").is_file()

    def prepare(self) -> None:
        """Check the data and the configuration before any work (a rerun must agree with
        the stored ``config.json``)."""
        self.data()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "config.json"
        current = self.config.as_dict()
        if path.is_file():
            changed = sorted(changed_keys(read_json(path), current))
            if changed:
                raise PruningError(
                    f"{self.root} was made with another configuration ({', '.join(changed)} "
                    f"differ); use --out elsewhere or remove the folder")
        write_json_atomic(path, current)
        torch.set_num_threads(self.config.threads)

    # ---------------------------------------------------------------- the run
    def run(self) -> list[dict]:
        """Every stage in order; the tables after every finished round of stages, the plots at
        the end. Returns the rows."""
        from pruning.study.report import rows_of, write_outputs

        self.prepare()
        stages = self.stages()
        self.progress = Progress(self.config.name, len(stages), self.progress.stream)
        self.progress.line(
            f"{len(self.jobs())} evaluated models, {len(stages)} stages; "
            f"{self.config.verify.images} images each at eps {self.config.verify_eps:g}, "
            f"timeout {self.config.verify.timeout:g} s (retry {self.config.verify.retry_timeout:g}"
            f" s); output {self.root}")
        last_round = None
        for stage in stages:
            if last_round is not None and stage.job.round != last_round and stage.kind == "prune":
                write_outputs(self, rows_of(self), final=False)
            last_round = stage.job.round
            start = time.monotonic()
            self.progress.stage(stage.name)
            did = self.run_stage(stage)
            self.progress.finished(time.monotonic() - start if did else None)
        rows = rows_of(self)
        self.outputs = write_outputs(self, rows, final=True)
        self.progress.line(f"done: {sum(self.work.values())} stage(s) of work in this run "
                           f"({', '.join(f'{k} {v}' for k, v in self.work.items())})")
        return rows

    # ---------------------------------------------------------------- stage: train
    def base_recipe(self, regime: str, seed: int, base: str):
        from pruning.recipes import DenseRecipe
        from pruning.train import regime_train_config

        section = self.config.train
        regulariser = {"dense": None, "dense-nrs": "nrs", "dense-slim": "slim"}[base]
        return DenseRecipe(
            model=self.config.model, dataset=self.config.dataset, regime=regime,
            attack=self.attack(), seed=seed, rewind_epoch=section.rewind_epoch,
            train=regime_train_config(regime, epochs=section.epochs,
                                      batch_size=section.batch_size, lr=section.lr,
                                      optimizer=section.optimizer, seed=seed),
            ramp_epochs=section.ramp_epochs, grad_align_weight=section.grad_align_weight,
            regulariser=regulariser, rs_weight=self.config.prune.rs_weight,
            slim_penalty=self.config.prune.slim_penalty)

    def train_base(self, regime: str, seed: int, base: str) -> bool | None:
        from pruning.recipes import train_dense

        out = self.layout.base_dir(regime, seed, base)
        if (out / "train.json").is_file():
            return None
        if (out / "error.json").is_file():
            return False
        recipe = self.base_recipe(regime, seed, base)
        train_data, _ = self.data()
        try:
            _, meta, history = train_dense(recipe, train_data, out, eval_data=self.eval_data(),
                                           device=self.device, dtype=self.dtype,
                                           desc=f"{regime} {base} seed {seed}")
        except PruningError as err:  # e.g. the slimming penalty on a model without BatchNorm
            return self._failed(out, ModelJob(regime, seed, base), err)
        write_json_atomic(out / "train.json", {
            **meta, "train_config": dataclasses.asdict(recipe.train), "n_train": len(train_data),
            "epochs": [dataclasses.asdict(h) for h in history],
            "seconds": sum(h.seconds for h in history)})
        return self._did("train", f"{regime} seed{seed} {base}")

    # ---------------------------------------------------------------- stage: prune
    def prune_recipe(self, job: ModelJob):
        from pruning.methods import get_method
        from pruning.recipes import PruneRecipe
        from pruning.schedule import ScheduleConfig
        from pruning.train import TrainConfig, regime_train_config

        prune, section = self.config.prune, self.config.train
        method = get_method(job.method)
        rounds = dict(self.tracks())[job.method]
        if is_control(job.method):
            targets = (0.0,) * rounds
            schedule = ScheduleConfig("iterative", rounds, "pt", prune.scope)
        else:
            targets = tuple(prune.ladder(method.structured).targets())
            schedule = ScheduleConfig("iterative", rounds, prune.rewind, prune.scope)
        epochs = prune.finetune_epochs or section.epochs
        return PruneRecipe(
            method=job.method, target=targets[-1], targets=targets, schedule=schedule,
            regime=job.regime, attack=self.attack(), layers=prune.layers,
            finetune=regime_train_config(job.regime, epochs=epochs,
                                         batch_size=section.batch_size, seed=job.seed),
            score_training=TrainConfig(epochs=prune.score_epochs, lr=prune.score_lr,
                                       batch_size=section.batch_size, seed=job.seed),
            stability_weight=prune.stability_weight, score_batches=prune.score_batches,
            slim_penalty=prune.slim_penalty, seed=job.seed)

    def prune_round(self, job: ModelJob) -> bool | None:
        from pruning.recipes import prune_checkpoint

        folder = self.layout.rounds_dir(job)
        if self.layout.checkpoint(job).is_file() and (folder / f"round_{job.round}.json").is_file():
            return None
        if (folder / "error.json").is_file():
            return False
        base = self.layout.base_dir(job.regime, job.seed, base_of(job.method))
        try:
            if (base / "error.json").is_file():
                raise PruningError(read_json(base / "error.json")["error"])
            prune_checkpoint(self.prune_recipe(job), base / "model.pt", self.data()[0], folder,
                             device=self.device, dtype=self.dtype, stop_after=job.round)
        except PruningError as err:  # e.g. a channel fraction that empties a layer
            return self._failed(folder, job, err)
        return self._did("prune", job.key)

    def _failed(self, folder: Path, job: ModelJob, err: PruningError) -> bool:
        """Record that ``job`` cannot be built (its rows say why); the study goes on."""
        write_json_atomic(folder / "error.json", {"round": job.round, "error": str(err)})
        self._record(f"error {job.key}")
        self.progress.line(f"  {job.key}: cannot build: {err}")
        return False

    # ---------------------------------------------------------------- stage: measure
    def load_model(self, job: ModelJob):
        model, _ = load_checkpoint(self.layout.checkpoint(job), self.device, self.dtype)
        return model.eval()

    def measure(self, job: ModelJob) -> bool | None:
        """Clean and PGD accuracy on the first ``test_limit`` test images; weight sparsity
        overall and in the layer scope, channels kept; unstable ReLUs under IBP (mean and per
        layer, absolute) over the verification eps-balls of the first ``verify.images``."""
        from pruning.evaluate import accuracy, pgd_accuracy
        from pruning.methods.structured import channel_report
        from pruning.schedule import RoundEvaluator
        from pruning.sparsity import overall_sparsity, scoped_sparsity, sparsity_report

        path = self.layout.eval_dir(job) / "metrics.json"
        if path.is_file():
            return None
        start = time.monotonic()
        model = self.load_model(job)
        attack = self.attack(verification=True)
        verify_data = self.verify_data()
        # IBP here, on every image; CROWN and alpha-CROWN counts come from the verifier's own
        # root records of each verified image (verify/img<i>.json), not computed twice
        unstable = RoundEvaluator(verify_data, attack, len(verify_data),
                                  methods=("ibp",)).unstable_relus(model)
        channels = channel_report(model)
        kept = sum(c["kept"] for c in channels.values())
        total = sum(c["total"] for c in channels.values())
        eval_data = self.eval_data()
        metrics = {
            "clean_accuracy": accuracy(model, eval_data),
            "pgd_accuracy": pgd_accuracy(model, eval_data, attack, seed=job.seed),
            "n_test": len(eval_data), "eps": attack.eps, "pgd_steps": attack.steps,
            "sparsity": overall_sparsity(sparsity_report(model)),
            "scoped_sparsity": scoped_sparsity(model, self.config.prune.layers),
            "channel_sparsity": 1 - kept / total if total else 0.0, "channels": channels,
            **unstable, "seconds": time.monotonic() - start}
        write_json_atomic(path, metrics)
        return self._did("measure", job.key)

    # ---------------------------------------------------------------- stage: export
    def export(self, job: ModelJob) -> bool | None:
        from pruning.compact import compact
        from pruning.export import export_onnx
        from pruning.sparsity import make_permanent

        path = self.layout.eval_dir(job) / "model.onnx"
        if path.is_file():
            return None
        model = self.load_model(job)
        make_permanent(model)
        removed = {}
        if self.config.verify.compact:
            model, removed = compact(model)
        replace_atomic(path, lambda tmp: export_onnx(model, self.info.input_shape, tmp))
        write_json_atomic(path.with_name("export.json"), {
            "compacted": self.config.verify.compact,
            "units_removed": {str(k): v for k, v in removed.items()}})
        return self._did("export", job.key)

    # ---------------------------------------------------------------- stage: verify
    def verify(self, job: ModelJob) -> bool | None:
        """Verify the images not yet done at ``verify.timeout``."""
        n = self.config.verify.images
        todo = [i for i in range(n) if not self.layout.verdict(job, i).is_file()]
        return self._verify_images(job, todo, self.config.verify.timeout, "verify")

    def reverify(self, job: ModelJob) -> bool | None:
        """The first pass's timeouts again at ``verify.retry_timeout`` (once per image)."""
        retry = self.config.verify.retry_timeout
        todo = []
        for i in range(self.config.verify.images):
            record = read_json(self.layout.verdict(job, i))
            if record and record["verdict"] == "timeout" and record["timeout"] < retry:
                todo.append(i)
        return self._verify_images(job, todo, retry, "reverify")

    def _verify_images(self, job: ModelJob, todo: list[int], timeout: float,
                       kind: str) -> bool | None:
        from pruning.study.verify_images import ImageVerifier

        if not todo:
            return None
        verifier = ImageVerifier(self.layout.eval_dir(job) / "model.onnx", self.load_model(job),
                                 self.info, self.config.dataset, self.config.verify_eps)
        images = self.verify_data()
        start = time.monotonic()
        for count, i in enumerate(todo, start=1):
            path = self.layout.verdict(job, i)
            previous = read_json(path)
            record = verifier.verify(images, i, timeout, path.with_suffix(".jsonl"))
            if previous is not None:  # a retry keeps the first pass's verdict and time
                record.update(first_verdict=previous["verdict"],
                              first_seconds=previous["seconds"],
                              first_timeout=previous["timeout"])
            write_json_atomic(path, record)
            self.work[kind] += 1
            self._record(f"{kind} {job.key} img{i} {record['verdict']}")
            left = (time.monotonic() - start) / count * (len(todo) - count)
            self.progress.line(f"  {job.key} img {i}: {record['verdict']} "
                               f"({record['seconds'] or 0:.2f} s; {kind} ETA "
                               f"~{Progress.clock(left)})")
        return True
