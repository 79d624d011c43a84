"""The stages of a study, each resumable: train a dense model per regime, prune it with every
method at every sparsity of the ladder (fine-tuning included), measure, export to ONNX, verify
the first N test images in-process.

Layout under ``<out>/<name>/`` (every file written atomically, so an interrupted stage is
redone and a finished one is skipped)::

    config.json                 the resolved configuration (a rerun must agree with it)
    stages.log                  one line per stage that did work (not for skipped ones)
    <regime>/dense/             init.pt, rewind.pt, train.ckpt (while training), model.pt,
                                train.json
    <regime>/<method>_s<S>/     rounds/ (pruning.schedule's checkpoints), model.pt, prune.json
                                (or error.json when the method cannot reach S)
    <each model dir>/metrics.json   clean / PGD accuracy, unstable ReLUs (IBP, CROWN)
    <each model dir>/model.onnx     what is verified (compacted unless verify.compact = false)
    <each model dir>/verify/img<i>.json    one verdict per test image
    <each model dir>/verify/img<i>.jsonl   its `verify --stats` records (read by verifier.stats)

Verification calls ``verifier.verify.verify`` on a ``BoundedModel`` of the exported ONNX file
and the VNN-LIB property ``pruning.export.vnnlib_robustness`` writes (parsed from its text),
exactly what ``certiprune verify model.onnx img<i>.vnnlib --timeout T --stats F`` does, without
a process (and ~3 s of imports) per image. Images the model misclassifies are not verified:
they are recorded as ``misclassified`` and count as not certified.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from pruning.checkpoint import load_checkpoint, save_checkpoint
from pruning.data import ImageData, dataset_info, load_dataset, resolve_data_dir
from pruning.errors import PruningError
from pruning.study.config import StudyConfig, changed_keys

VERDICTS = ("unsat", "sat", "timeout", "unknown", "error", "misclassified")


def model_key(method: str, sparsity: float) -> str:
    """The folder name of a (method, sparsity) model: ``dense`` at sparsity 0."""
    return "dense" if method == "dense" else f"{method}_s{sparsity:g}"


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class ModelJob:
    """One row of the table: the dense model of a regime, or one (method, sparsity)."""

    regime: str
    method: str  # "dense" or a pruning method
    sparsity: float

    @property
    def key(self) -> str:
        return model_key(self.method, self.sparsity)


class Progress:
    """Stage lines on stderr with elapsed time and a rough ETA (mean time of the stages that did
    work so far × stages left)."""

    def __init__(self, name: str, total: int, stream=sys.stderr):
        self.name, self.total, self.stream = name, total, stream
        self.start = time.monotonic()
        self.done = 0
        self.worked = 0
        self.work_seconds = 0.0

    def line(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[study {self.name} {_clock(elapsed)}] {message}", file=self.stream, flush=True)

    def stage(self, message: str) -> None:
        left = self.total - self.done
        eta = ""
        if self.worked:
            eta = f", ETA ~{_clock(self.work_seconds / self.worked * left)}"
        self.line(f"stage {self.done + 1}/{self.total}: {message}{eta}")

    def finished(self, seconds: float | None) -> None:
        """A stage ended; ``seconds`` is its work time, None when it was skipped."""
        self.done += 1
        if seconds is not None:
            self.worked += 1
            self.work_seconds += seconds


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Study:
    """Runs (or resumes) a study; ``run()`` returns the rows and the work done.

    ``work`` counts the stages that did work in this call: ``train``, ``prune``, ``measure``,
    ``export`` and ``verify`` (images); a rerun of a finished study counts none.
    """

    def __init__(self, config: StudyConfig, out: Path, data_dir: str | None = None,
                 log_stream=sys.stderr):
        self.config = config
        self.root = Path(out) / config.name
        self.data_dir = data_dir if data_dir is not None else config.data_dir
        self.work = {"train": 0, "prune": 0, "measure": 0, "export": 0, "verify": 0}
        self.log_stream = log_stream
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._data: tuple[ImageData, ImageData] | None = None
        self.info = dataset_info(config.dataset)

    # ---------------------------------------------------------------- plumbing
    def jobs(self) -> list[ModelJob]:
        prune = self.config.prune
        jobs = []
        for regime in self.config.train.regimes:
            jobs.append(ModelJob(regime, "dense", 0.0))
            jobs += [ModelJob(regime, method, s) for s in prune.sparsities if s > 0
                     for method in prune.methods]
        return jobs

    def model_dir(self, job: ModelJob) -> Path:
        return self.root / job.regime / job.key

    def _record(self, stage: str) -> None:
        with open(self.root / "stages.log", "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {stage}\n")

    def data(self) -> tuple[ImageData, ImageData]:
        """(training images, test images): the first ``train_limit`` / enough test images for
        the accuracy columns and verification."""
        if self._data is None:
            root = resolve_data_dir(self.data_dir)
            try:
                train = load_dataset(self.config.dataset, root, "train")
                test = load_dataset(self.config.dataset, root, "test")
            except PruningError as err:
                raise PruningError(f"{err} (dataset {self.config.dataset} under {root}; see "
                                   "benchmarks/STUDY.md for what each config needs)") from None
            n_test = max(self.config.test_limit or len(test), self.config.verify.images)
            self._data = (train.head(self.config.train_limit).to(self.device, self.dtype),
                          test.head(n_test).to(self.device, self.dtype))
        return self._data

    def eval_data(self) -> ImageData:
        return self.data()[1].head(self.config.test_limit)

    def train_attack(self):
        from pruning.objectives import AttackConfig

        return AttackConfig(eps=self.config.train_eps, steps=self.config.verify.pgd_steps)

    def measure_attack(self):
        from pruning.objectives import AttackConfig

        return AttackConfig(eps=self.config.verify_eps, steps=self.config.verify.pgd_steps)

    def _check_config(self) -> None:
        path = self.root / "config.json"
        current = self.config.as_dict()
        if path.is_file():
            changed = sorted(changed_keys(read_json(path), current))
            if changed:
                raise PruningError(
                    f"{self.root} was made with another configuration ({', '.join(changed)} "
                    f"differ); use --out elsewhere or remove the folder")
        write_json_atomic(path, current)

    # ---------------------------------------------------------------- the run
    def run(self) -> list[dict]:
        """Every stage in order; the table is rewritten after each model, the plots and
        tightness reports at the end. Returns the rows."""
        from pruning.study.report import rows_of, write_outputs

        self.data()  # a missing dataset stops the run before anything is written
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_config()
        torch.set_num_threads(self.config.threads)
        jobs = self.jobs()
        progress = Progress(self.config.name, total=4 * len(jobs), stream=self.log_stream)
        self.progress = progress
        progress.line(f"{len(jobs)} models ({len(self.config.train.regimes)} regime(s)), "
                      f"{self.config.verify.images} images each at eps {self.config.verify_eps:g}"
                      f", timeout {self.config.verify.timeout:g} s; output {self.root}")
        for job in jobs:
            ok = self._stage(progress, f"{'train' if job.method == 'dense' else 'prune'} "
                             f"{job.regime}/{job.key}", lambda: self.build(job))
            if not ok:
                progress.finished(None)
                progress.finished(None)
                progress.finished(None)
                continue
            self._stage(progress, f"measure {job.regime}/{job.key}", lambda: self.measure(job))
            self._stage(progress, f"export {job.regime}/{job.key}", lambda: self.export(job))
            self._stage(progress, f"verify {job.regime}/{job.key}", lambda: self.verify(job))
            write_outputs(self, rows_of(self), final=False)
        rows = rows_of(self)
        self.outputs = write_outputs(self, rows, final=True)
        progress.line(f"done: {sum(self.work.values())} stage(s) of work in this run "
                      f"({', '.join(f'{k} {v}' for k, v in self.work.items())})")
        return rows

    def _stage(self, progress: Progress, what: str, stage: Callable[[], bool | None]) -> bool:
        """Run one stage; it returns True when it did work, False when it cannot (an error
        recorded for its model), None when it was already done."""
        start = time.monotonic()
        progress.stage(what)
        did = stage()
        progress.finished(time.monotonic() - start if did else None)
        return did is not False

    # ---------------------------------------------------------------- stage 1: models
    def build(self, job: ModelJob) -> bool | None:
        if job.method == "dense":
            return self.train_dense(job.regime)
        return self.prune(job)

    def train_dense(self, regime: str) -> bool | None:
        from pruning.models import build_model
        from pruning.objectives import make_regime
        from pruning.train import regime_train_config, train

        out = self.root / regime / "dense"
        if (out / "train.json").is_file():
            return None
        cfg, section = self.config, self.config.train
        train_data, _ = self.data()
        eval_data, attack = self.eval_data(), self.train_attack()
        train_config = regime_train_config(
            regime, epochs=section.epochs, batch_size=section.batch_size, lr=section.lr,
            optimizer=section.optimizer, seed=cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, self.info).to(self.device, self.dtype)
        ramp = section.ramp_epochs if section.ramp_epochs is not None else section.epochs / 2
        objective = make_regime(regime, attack, ramp_epochs=ramp,
                                grad_align_weight=section.grad_align_weight)
        meta = {"model": cfg.model, "dataset": cfg.dataset, "regime": regime,
                "eps": cfg.train_eps, "seed": cfg.seed}
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "init.pt").is_file():
            save_checkpoint(out / "init.pt", model, {**meta, "epoch": 0})
            if section.rewind_epoch == 0:
                save_checkpoint(out / "rewind.pt", model, {**meta, "epoch": 0})

        def snapshot(epoch, trained):
            if epoch == section.rewind_epoch:
                save_checkpoint(out / "rewind.pt", trained, {**meta, "epoch": epoch})

        history = train(model, objective, train_data, train_config, eval_data=eval_data,
                        eval_attack=attack, checkpoint=out / "train.ckpt", after_epoch=snapshot,
                        progress=True, desc=f"{regime} dense")
        save_checkpoint(out / "model.pt", model, {**meta, "epoch": section.epochs})
        write_json_atomic(out / "train.json", {
            "regime": regime, **meta, "train_config": dataclasses.asdict(train_config),
            "objective": type(objective).__name__, "n_train": len(train_data),
            "epochs": [dataclasses.asdict(h) for h in history],
            "seconds": sum(h.seconds for h in history)})
        (out / "train.ckpt").unlink(missing_ok=True)
        self.work["train"] += 1
        self._record(f"train {regime}")
        return True

    def prune(self, job: ModelJob) -> bool | None:
        from pruning.methods import PruneContext, get_method
        from pruning.methods.structured import channel_report, check_channel_fraction
        from pruning.objectives import make_regime
        from pruning.schedule import RoundEvaluator, ScheduleConfig, run_schedule
        from pruning.sparsity import layer_weights, make_permanent, overall_sparsity, \
            sparsity_report
        from pruning.train import TrainConfig

        out = self.model_dir(job)
        if (out / "prune.json").is_file():
            return None
        if (out / "error.json").is_file():
            return False
        cfg, section = self.config, self.config.prune
        dense = self.root / job.regime / "dense"
        method = get_method(job.method)
        plan = section.schedule_of(job.method, method.schedule)
        schedule = ScheduleConfig(kind=plan.kind, rounds=plan.rounds, rewind=plan.rewind,
                                  scope=section.scope)
        model, meta = load_checkpoint(dense / "model.pt", self.device, self.dtype)
        try:
            if method.structured:
                check_channel_fraction(model, job.sparsity)
            early_state = None
            if schedule.kind == "iterative" and schedule.rewind != "pt":
                source = "rewind.pt" if schedule.rewind == "rewind_lt" else "init.pt"
                early_state = layer_weights(load_checkpoint(dense / source)[0])
        except PruningError as err:
            return self._failed(out, job, err)
        train_data, _ = self.data()
        attack = self.train_attack()
        ctx = PruneContext(
            data=train_data, objective=make_regime(job.regime, attack), attack=attack,
            device=self.device, dtype=self.dtype,
            score_training=TrainConfig(epochs=section.score_epochs, lr=section.score_lr,
                                       batch_size=cfg.train.batch_size, seed=cfg.seed),
            stability_weight=section.stability_weight, score_batches=section.score_batches,
            slim_penalty=section.slim_penalty, seed=cfg.seed, progress=True)
        finetune = TrainConfig(epochs=section.finetune_epochs, lr=section.finetune_lr,
                               batch_size=cfg.train.batch_size, seed=cfg.seed)
        model.train()
        try:
            rounds = run_schedule(
                model, method, job.sparsity, schedule, ctx, finetune, out / "rounds",
                early_state=early_state,
                evaluate=RoundEvaluator(self.eval_data(), self.measure_attack(),
                                        n_bound_images=cfg.verify.images))
        except PruningError as err:  # e.g. slim without BatchNorm, a diverged fine-tuning
            return self._failed(out, job, err)
        make_permanent(model)
        model.eval()
        report = sparsity_report(model)
        save_checkpoint(out / "model.pt", model, {**meta, "method": job.method,
                                                  "sparsity": job.sparsity,
                                                  "scope": section.scope})
        write_json_atomic(out / "prune.json", {
            "regime": job.regime, "method": job.method, "target_sparsity": job.sparsity,
            "schedule": dataclasses.asdict(schedule), "structured": method.structured,
            "sparsity": overall_sparsity(report), "channels": channel_report(model),
            "rounds": rounds, "seconds": sum(r["seconds"] for r in rounds)})
        self.work["prune"] += 1
        self._record(f"prune {job.regime} {job.key}")
        return True

    def _failed(self, out: Path, job: ModelJob, err: PruningError) -> bool:
        """Record that ``job`` cannot be built (its row says why); the study goes on."""
        write_json_atomic(out / "error.json", {"error": str(err)})
        self._record(f"error {job.regime} {job.key}")
        self.progress.line(f"  {job.regime}/{job.key}: cannot prune: {err}")
        return False

    # ---------------------------------------------------------------- stage 2: measure
    def load_model(self, job: ModelJob):
        model, _ = load_checkpoint(self.model_dir(job) / "model.pt", self.device, self.dtype)
        return model.eval()

    def measure(self, job: ModelJob) -> bool | None:
        """Clean and PGD accuracy on the first ``test_limit`` test images, unstable ReLUs
        (IBP, CROWN) over the verification eps-ball of the first ``verify.images``."""
        from pruning.evaluate import accuracy, pgd_accuracy
        from pruning.schedule import RoundEvaluator
        from pruning.sparsity import overall_sparsity, sparsity_report

        path = self.model_dir(job) / "metrics.json"
        if path.is_file():
            return None
        start = time.monotonic()
        model = self.load_model(job)
        eval_data, attack = self.eval_data(), self.measure_attack()
        verify_data = self.data()[1].head(self.config.verify.images)
        unstable = RoundEvaluator(verify_data, attack, len(verify_data)).unstable_relus(model)
        metrics = {"clean_accuracy": accuracy(model, eval_data),
                   "pgd_accuracy": pgd_accuracy(model, eval_data, attack, seed=self.config.seed),
                   "n_test": len(eval_data), "eps": attack.eps, "pgd_steps": attack.steps,
                   "sparsity": overall_sparsity(sparsity_report(model)), **unstable,
                   "seconds": time.monotonic() - start}
        write_json_atomic(path, metrics)
        self.work["measure"] += 1
        self._record(f"measure {job.regime} {job.key}")
        return True

    # ---------------------------------------------------------------- stage 3: export
    def export(self, job: ModelJob) -> bool | None:
        from pruning.compact import compact
        from pruning.export import export_onnx
        from pruning.sparsity import make_permanent

        path = self.model_dir(job) / "model.onnx"
        if path.is_file():
            return None
        model = self.load_model(job)
        make_permanent(model)
        removed = {}
        if self.config.verify.compact:
            model, removed = compact(model)
        tmp = export_onnx(model, self.info.input_shape, path.with_name("model.onnx.tmp"))
        os.replace(tmp, path)
        write_json_atomic(path.with_name("export.json"), {
            "compacted": self.config.verify.compact,
            "units_removed": {str(k): v for k, v in removed.items()}})
        self.work["export"] += 1
        self._record(f"export {job.regime} {job.key}")
        return True

    # ---------------------------------------------------------------- stage 4: verify
    def verify(self, job: ModelJob) -> bool | None:
        """Verify the first ``verify.images`` test images not yet done; per image one JSON
        verdict and its ``--stats`` records."""
        folder = self.model_dir(job) / "verify"
        n = self.config.verify.images
        todo = [i for i in range(n) if not (folder / f"img{i}.json").is_file()]
        if not todo:
            return None
        from pruning.export import vnnlib_robustness
        from verifier import BoundedModel
        from verifier.io.vnnlib import parse_vnnlib
        from verifier.verify import VerifyConfig, verify

        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = self.model_dir(job) / "model.onnx"
        torch_model = self.load_model(job)
        bounded = BoundedModel(str(onnx_path), device=self.device, dtype=self.dtype)
        graph = bounded.graph()
        n_in, n_out = graph.nodes[0].numel, graph.nodes[graph.output].numel
        images = self.data()[1].head(n)
        eps, timeout = self.config.verify_eps, self.config.verify.timeout
        config = VerifyConfig(timeout=timeout)
        with torch.no_grad():
            predicted = torch_model(images.images).argmax(1)
        start = time.monotonic()
        for count, i in enumerate(todo, start=1):
            label = int(images.labels[i])
            record = {"image": i, "label": label, "predicted": int(predicted[i]), "eps": eps,
                      "timeout": timeout}
            if int(predicted[i]) != label:
                record.update(verdict="misclassified", seconds=0.0, subdomains=0)
            else:
                text = vnnlib_robustness(images.images[i], label, eps, self.info.n_classes,
                                         comment=f"{self.config.dataset} test image {i}")
                spec_name = f"img{i}_eps{eps:g}.vnnlib"
                prop = parse_vnnlib(text, spec_name, n_in, n_out)
                try:
                    result = verify(bounded, prop, config)
                except Exception as err:  # noqa: BLE001 - one image must not end a long run
                    record.update(verdict="error", seconds=None, subdomains=0,
                                  error=f"{type(err).__name__}: {err}")
                    self.progress.line(f"  {job.regime}/{job.key} img {i}: verifier error: "
                                       f"{record['error']}")
                else:
                    record.update(self._stats_records(bounded, prop, result, config, onnx_path,
                                                      spec_name, folder / f"img{i}.jsonl"))
            write_json_atomic(folder / f"img{i}.json", record)
            self.work["verify"] += 1
            self._record(f"verify {job.regime} {job.key} img{i} {record['verdict']}")
            left = (time.monotonic() - start) / count * (len(todo) - count)
            self.progress.line(f"  {job.regime}/{job.key} img {i + 1}/{n}: {record['verdict']}"
                               f" ({record['seconds'] or 0:.2f} s; model ETA ~{_clock(left)})")
        return True

    @staticmethod
    def _stats_records(bounded, prop, result, config, onnx_path, spec_name, path: Path) -> dict:
        """Complete the root records (after the verdict, untimed, as ``verify --stats``),
        write them atomically to ``path``; returns the image's summary fields."""
        from verifier.verify import complete_root_records

        records = result.records
        roots = {}
        if records is not None:
            complete_root_records(bounded, prop, records, config)
            tmp = path.with_name(path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            records.write(str(tmp), {"model": str(onnx_path), "spec": spec_name,
                                     "result": result.status}, seconds=result.seconds)
            os.replace(tmp, path)
            roots = {method: sum(sum(r.unstable.get(method, [])) for r in records.roots.values())
                     for method in ("ibp", "crown", "alpha")}
        return {"verdict": result.status, "seconds": result.seconds,
                "subdomains": records.count if records is not None else 0,
                "max_depth": records.max_depth() if records is not None else 0,
                "root_unstable": roots}
