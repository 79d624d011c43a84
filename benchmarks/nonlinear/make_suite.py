"""Build the sigmoid / tanh / max-pool suite (issue 23) reproducibly from the MNIST IDX files.

    python -m benchmarks.nonlinear.make_suite train  --data-dir /work/shared/datasets
    python -m benchmarks.nonlinear.make_suite export --data-dir /work/shared/datasets
    python -m benchmarks.nonlinear.make_suite attack
    certiprune bench benchmarks/data/nonlinear/instances.csv --out runs/bench/nonlinear_before.csv --threads 1
    python -m benchmarks.nonlinear.crosscheck          # exact MILP of the max-pool CNN's boxes
    python -m benchmarks.nonlinear.make_suite answers

``train``: each model of ``models.SUITE`` with ``pruning.train.train`` (standard cross-entropy,
Adam, cosine lr, seed 0, CPU-deterministic; resumable checkpoint in ``--work``). ``export``: the
ONNX file, checked against PyTorch with onnxruntime on 500 test images, and the VNN-LIB
properties of the first ``n_images`` correctly classified test images at each eps
(``pruning.export.vnnlib_robustness``: box clipped to [0, 1], one disjunct per wrong class), and
``instances.csv`` (60 s each). ``attack``: the strong PGD of ``attack.py`` per instance,
confirmed by onnxruntime (``--work``/attack.csv). ``answers``: ``answers.csv`` in the suite
folder, in REFERENCE.csv's form, from the attack, the sat / unsat verdicts of a ``certiprune
bench`` run (``--bench``) and the cross-checks (``crosscheck.py``); disagreements stop it.
Every stage skips what is already written, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.nonlinear.attack import StrongPGD, find_counterexample
from benchmarks.nonlinear.models import SUITE, SuiteModel, to_onnx_nonlinear
from pruning.data import dataset_info, load_dataset, resolve_data_dir
from pruning.evaluate import accuracy
from pruning.export import vnnlib_robustness
from pruning.objectives import Standard
from pruning.train import TrainConfig, train

SUITE_DIR = Path(__file__).resolve().parents[1] / "data" / "nonlinear"
TIMEOUT = 60
BENCHMARK = "nonlinear"
INFO = dataset_info("mnist")


def vnnlib_name(model: SuiteModel, image: int, eps: float) -> str:
    return f"vnnlib/{model.name}_img{image}_eps{eps}.vnnlib"


def trained(model: SuiteModel, work: Path, data_dir: Path | None = None) -> torch.nn.Module:
    """The trained network (training it first, resumably, when ``data_dir`` is given)."""
    net = model.build(INFO)
    weights = work / model.name / "model.pt"
    if not weights.is_file():
        if data_dir is None:
            raise SystemExit(f"{weights} missing: run the train stage first")
        torch.manual_seed(0)
        net = model.build(INFO)
        train_data = load_dataset("mnist", data_dir, "train")
        test_data = load_dataset("mnist", data_dir, "test")
        config = TrainConfig(epochs=model.epochs, lr=model.lr, seed=0)
        weights.parent.mkdir(parents=True, exist_ok=True)
        train(net, Standard(), train_data, config, eval_data=test_data,
              checkpoint=weights.parent / "train.pt", progress=True, desc=model.name)
        torch.save(net.state_dict(), weights)
        print(f"{model.name}: test accuracy {accuracy(net, test_data):.4f}", file=sys.stderr)
    net.load_state_dict(torch.load(weights))
    return net.eval()


def export(model: SuiteModel, work: Path, data_dir: Path, out: Path) -> list[str]:
    """Write the ONNX file and the properties; returns the instances.csv rows."""
    import onnx
    import onnxruntime as ort
    net = trained(model, work)
    onnx_path = out / f"{model.name}.onnx"
    if not onnx_path.is_file():
        onnx.save(to_onnx_nonlinear(net, INFO.input_shape), str(onnx_path))
    test = load_dataset("mnist", data_dir, "test")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = test.images[:500].numpy()
    ort_out = session.run(None, {"input": images})[0]
    with torch.no_grad():
        torch_out = net(test.images[:500]).numpy()
    print(f"{model.name}: onnxruntime vs torch max |diff| {np.abs(ort_out - torch_out).max():.2e} on 500 images, "
          f"accuracy {np.mean(ort_out.argmax(1) == test.labels[:500].numpy()):.4f}", file=sys.stderr)
    correct = [i for i in range(len(images)) if ort_out[i].argmax() == int(test.labels[i])][:model.n_images]
    rows = []
    for eps in model.eps:
        for i in correct:
            path = out / vnnlib_name(model, i, eps)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(vnnlib_robustness(
                    test.images[i], int(test.labels[i]), eps, INFO.n_classes,
                    comment=f"MNIST test image {i} (label {int(test.labels[i])}), {model.name}, "
                            f"eps {eps} (benchmarks/nonlinear/make_suite.py)"))
            rows.append(f"{model.name}.onnx,{vnnlib_name(model, i, eps)},{TIMEOUT}")
    return rows


def instances(out: Path):
    from benchmarks.instances import read_instances
    return read_instances(out / "instances.csv")


def label_of(vnnlib_path: str) -> int:
    """The true class, from the property's comment line written by ``vnnlib_robustness``."""
    for line in Path(vnnlib_path).read_text().splitlines()[:3]:
        if line.startswith("; label "):
            return int(line.split()[2].rstrip(","))
    raise ValueError(f"{vnnlib_path}: no label comment")


def done_keys(path: Path) -> set[tuple[str, str]]:
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {(row["onnx"], row["vnnlib"]) for row in csv.DictReader(f)}


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_attacks(work: Path, out: Path, config: StrongPGD) -> None:
    """attack.csv: per instance, sat (confirmed by onnxruntime) with its margin, or none."""
    import onnxruntime as ort
    from verifier.io.vnnlib import load_vnnlib
    target = work / "attack.csv"
    done = done_keys(target)
    sessions, nets = {}, {}
    for inst in instances(out):
        if (inst.onnx, inst.vnnlib) in done:
            continue
        name = inst.onnx[:-len(".onnx")]
        if name not in nets:
            nets[name] = trained(next(m for m in SUITE if m.name == name), work)
            sessions[name] = ort.InferenceSession(inst.onnx_path, providers=["CPUExecutionProvider"])
        region = load_vnnlib(inst.vnnlib_path).regions[0]
        start = time.perf_counter()
        found, torch_margin = find_counterexample(nets[name], sessions[name], region.lower, region.upper,
                                                  label_of(inst.vnnlib_path), INFO.input_shape,
                                                  INFO.n_classes, config)
        row = dict(onnx=inst.onnx, vnnlib=inst.vnnlib, result="sat" if found else "none",
                   restarts=config.restarts, steps=config.steps,
                   ort_margin=f"{found.margin:.6g}" if found else "",
                   target=found.target if found else "", torch_best_margin=f"{torch_margin:.6g}",
                   seconds=f"{time.perf_counter() - start:.2f}")
        if found:
            (work / "counterexamples").mkdir(exist_ok=True)
            np.save(work / "counterexamples" / f"{Path(inst.vnnlib).stem}.npy", found.x)
        append_row(target, row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)


def read_rows(path: Path) -> dict[tuple[str, str], dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {(row["onnx"], row["vnnlib"]): row for row in csv.DictReader(f)}


def confirm_result_file(inst, bench: Path, out: Path) -> str:
    """The counterexample of a sat verdict, read from the result file ``certiprune bench`` kept,
    checked inside the box and against onnxruntime; saved as counterexamples/<property>.npy.
    Returns onnxruntime's margin (largest wrong logit minus the true one), as text."""
    import re
    import onnxruntime as ort
    from benchmarks.bench import result_file_path
    from verifier.io.vnnlib import load_vnnlib
    text = result_file_path(str(bench), inst).read_text()
    values = {int(i): float(v) for i, v in re.findall(r"\(X_(\d+) ([^)\s]+)\)", text)}
    x = np.array([values[i] for i in range(len(values))], dtype=np.float32)
    region = load_vnnlib(inst.vnnlib_path).regions[0]
    if len(x) != len(region.lower) or np.any(x < region.lower) or np.any(x > region.upper):
        raise SystemExit(f"{inst.vnnlib}: the verifier's counterexample is not inside the box")
    session = ort.InferenceSession(inst.onnx_path, providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.reshape(1, *INFO.input_shape)})[0].reshape(-1)
    label = label_of(inst.vnnlib_path)
    margin = float(np.delete(y.astype(np.float64), label).max() - y[label])
    if margin < 0:
        raise SystemExit(f"{inst.vnnlib}: onnxruntime does not confirm the verifier's counterexample")
    (out / "counterexamples").mkdir(exist_ok=True)
    np.save(out / "counterexamples" / f"{Path(inst.vnnlib).stem}.npy", x)
    return f"{margin:.6g}"


def write_answers(work: Path, out: Path, benches: list[Path], engine: str) -> None:
    """answers.csv (REFERENCE.csv's leading columns, then how each answer was established) and
    counterexamples/<property>.npy (the float32 input of every sat answer)."""
    import shutil
    attacks, checks = read_rows(work / "attack.csv"), read_rows(work / "crosscheck.csv")
    verdicts: dict[tuple[str, str], tuple[dict, Path]] = {}    # the first decided row over the runs
    for run in benches:
        for key, row in read_rows(run).items():
            earlier = verdicts[key][0]["result"] if key in verdicts else None
            if earlier in ("sat", "unsat") and row["result"] in ("sat", "unsat") and row["result"] != earlier:
                raise SystemExit(f"{key}: {run} says {row['result']}, an earlier run {earlier}")
            if earlier not in ("sat", "unsat"):
                verdicts[key] = (row, run)
    rows = []
    for inst in instances(out):
        key = (inst.onnx, inst.vnnlib)
        attack, check = attacks.get(key), checks.get(key)
        verdict, bench = verdicts.get(key, (None, None))
        answer, how, margin = "unknown", [], ""
        if attack and attack["result"] == "sat":
            answer, margin = "sat", attack["ort_margin"]
            how.append("strong PGD, confirmed by onnxruntime")
            (out / "counterexamples").mkdir(exist_ok=True)
            shutil.copyfile(work / "counterexamples" / f"{Path(inst.vnnlib).stem}.npy",
                            out / "counterexamples" / f"{Path(inst.vnnlib).stem}.npy")
        if verdict and verdict["result"] in ("sat", "unsat"):
            if answer != "unknown" and verdict["result"] != answer:
                raise SystemExit(f"{key}: certiprune verify says {verdict['result']}, the attack {answer}")
            if verdict["result"] == "sat" and answer != "sat":
                margin = confirm_result_file(inst, bench, out)
                how.append("its counterexample confirmed here by onnxruntime")
            answer = verdict["result"]
            commit = engine or verdict["commit"]
            how.append(f"certiprune verify {commit} ({float(verdict['seconds']):.0f} s of "
                       f"{float(verdict['timeout']):.0f})")
        if check and check["result"] in ("sat", "unsat"):
            if answer != "unknown" and check["result"] != answer:
                raise SystemExit(f"{key}: cross-check {check['result']} contradicts {answer}")
            answer = check["result"]
            how.append(check["method"])
        rows.append(dict(benchmark=BENCHMARK, onnx=inst.onnx, vnnlib=inst.vnnlib, answer=answer,
                         how="; ".join(how), counterexample_margin=margin))
    with open(out / "answers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts = {a: sum(r["answer"] == a for r in rows) for a in ("sat", "unsat", "unknown")}
    print(f"answers.csv: {counts}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "export", "attack", "answers"))
    parser.add_argument("--data-dir", help="MNIST IDX root (default $CERTIPRUNE_DATA)")
    parser.add_argument("--work", default="runs/nonlinear", help="checkpoints and per-stage CSVs")
    parser.add_argument("--out", default=str(SUITE_DIR), help="the suite folder (committed)")
    parser.add_argument("--models", nargs="*", help="only these suite models (train, export)")
    parser.add_argument("--bench", nargs="+", default=["runs/bench/nonlinear_before.csv"],
                        help="answers: `certiprune bench` results whose sat / unsat verdicts count "
                             "(a conflict between them stops the stage)")
    parser.add_argument("--engine", default="", help="answers: the verifier's commit when the bench rows "
                                                     "say 'unknown' (a run from an exported tree)")
    parser.add_argument("--restarts", type=int, default=StrongPGD.restarts, help="attack: random starts")
    parser.add_argument("--steps", type=int, default=StrongPGD.steps, help="attack: PGD steps per start")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    selected = [m for m in SUITE if not args.models or m.name in args.models]
    if args.stage == "train":
        data_dir = resolve_data_dir(args.data_dir)
        for model in selected:
            trained(model, work, data_dir)
    elif args.stage == "export":
        data_dir = resolve_data_dir(args.data_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [row for model in SUITE for row in export(model, work, data_dir, out)]
        (out / "instances.csv").write_text("\n".join(rows) + "\n")
    elif args.stage == "attack":
        run_attacks(work, out, StrongPGD(restarts=args.restarts, steps=args.steps))
    else:
        write_answers(work, out, [Path(b) for b in args.bench], args.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
