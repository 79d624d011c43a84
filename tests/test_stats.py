"""Tightness statistics: records aggregated exactly on a hand-written run, a real tiny run through
``certiprune verify --stats`` and ``certiprune stats`` (JSON, CSVs, PNGs agree with the records),
two runs side by side, and one-line errors on bad input."""
import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from verifier.cli import main
from verifier.stats import build_tables, read_run, summarise

# ---- a hand-written run with known numbers ------------------------------------------------------
RELU = {"model": "a.onnx", "spec": "a.vnnlib", "result": "unsat", "instance_id": "A"}
SYNTHETIC = [
    {"record": "instance", **RELU, "seconds": 2.5, "subdomains": 5, "roots": [
        {"region": 0, "attack": 1.0, "ibp": -3.0, "crown": -1.0, "alpha": -0.5,
         "unstable": {"ibp": [4, 6], "crown": [3, 5], "alpha": [3, 4]}}]},
    {"record": "subdomain", **RELU, "id": 0, "parent": -1, "depth": 0, "lower": -0.5, "region": 0,
     "split": "root", "unstable": [3, 4]},
    {"record": "subdomain", **RELU, "id": 1, "parent": 0, "depth": 1, "lower": 0.25, "region": 0,
     "split": "relu", "unstable": [2, 4]},
    {"record": "subdomain", **RELU, "id": 2, "parent": 0, "depth": 1, "lower": -0.25, "region": 0,
     "split": "relu", "unstable": [3, 2]},
    {"record": "subdomain", **RELU, "id": 3, "parent": 2, "depth": 2, "lower": 0.5, "region": 0,
     "split": "relu", "unstable": [2, 2]},
    {"record": "subdomain", **RELU, "id": 4, "parent": 2, "depth": 2, "lower": 0.75, "region": 0,
     "split": "relu", "unstable": [1, 2]},
    # written before instance lines existed: no "record" field, no summary, input splitting
    {"model": "b.onnx", "spec": "b.vnnlib", "result": "timeout", "id": 0, "parent": -1, "depth": 0,
     "lower": -2.0, "region": 0, "time": 0.1, "split": "input"},
    {"model": "b.onnx", "spec": "b.vnnlib", "result": "timeout", "id": 1, "parent": 0, "depth": 1,
     "lower": -1.0, "region": 0, "time": 0.2, "split": "input", "index": 3},
    {"model": "b.onnx", "spec": "b.vnnlib", "result": "timeout", "id": 2, "parent": 0, "depth": 1,
     "lower": 0.5, "region": 0, "time": 0.2, "split": "input", "index": 3},
    # decided by the attack: no subdomain, alpha-CROWN not recorded
    {"record": "instance", "model": "c.onnx", "spec": "c.vnnlib", "result": "sat", "instance_id": "C",
     "seconds": 0.5, "subdomains": 0, "roots": [
         {"region": 0, "attack": -0.1, "ibp": -5.0, "crown": -0.5, "alpha": None,
          "unstable": {"ibp": [7], "crown": [2]}}]},
]


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def synthetic(tmp_path):
    return build_tables([read_run(str(write_lines(tmp_path / "synthetic.jsonl", SYNTHETIC)))])


def rows_of(table, model):
    return [{k: v for k, v in r.items() if k not in ("run", "model", "spec")} for r in table.rows
            if r["model"] == model]


def test_stats_instance_table_counts_subdomains_depths_verdicts(synthetic):
    rows = {r["model"]: r for r in synthetic["instances"].rows}
    assert rows["a.onnx"] == {"run": "synthetic", "model": "a.onnx", "spec": "a.vnnlib", "verdict": "unsat",
                              "seconds": 2.5, "regions": 1, "subdomains": 5, "max_depth": 2,
                              "mean_depth": pytest.approx(1.2), "split": "relu"}
    assert (rows["b.onnx"]["verdict"], rows["b.onnx"]["seconds"], rows["b.onnx"]["subdomains"],
            rows["b.onnx"]["max_depth"], rows["b.onnx"]["split"]) == ("timeout", None, 3, 1, "input")
    assert rows["b.onnx"]["mean_depth"] == pytest.approx(2 / 3)
    assert (rows["c.onnx"]["subdomains"], rows["c.onnx"]["max_depth"], rows["c.onnx"]["mean_depth"],
            rows["c.onnx"]["split"]) == (0, None, None, "none")


def test_stats_depth_table_worst_lower_bound_rises(synthetic):
    assert rows_of(synthetic["depth"], "a.onnx") == [
        {"depth": 0, "subdomains": 1, "closed": 0, "worst_lower": -0.5, "mean_lower": -0.5},
        {"depth": 1, "subdomains": 2, "closed": 1, "worst_lower": -0.25, "mean_lower": 0.0},
        {"depth": 2, "subdomains": 2, "closed": 2, "worst_lower": 0.5, "mean_lower": 0.625}]
    assert rows_of(synthetic["depth"], "b.onnx") == [
        {"depth": 0, "subdomains": 1, "closed": 0, "worst_lower": -2.0, "mean_lower": -2.0},
        {"depth": 1, "subdomains": 2, "closed": 1, "worst_lower": -1.0, "mean_lower": -0.25}]


def test_stats_layer_table_unstable_relus_by_depth(synthetic):
    assert rows_of(synthetic["layers"], "a.onnx") == [
        {"layer": 0, "depth": 0, "subdomains": 1, "mean_unstable": 3.0, "max_unstable": 3},
        {"layer": 0, "depth": 1, "subdomains": 2, "mean_unstable": 2.5, "max_unstable": 3},
        {"layer": 0, "depth": 2, "subdomains": 2, "mean_unstable": 1.5, "max_unstable": 2},
        {"layer": 1, "depth": 0, "subdomains": 1, "mean_unstable": 4.0, "max_unstable": 4},
        {"layer": 1, "depth": 1, "subdomains": 2, "mean_unstable": 3.0, "max_unstable": 4},
        {"layer": 1, "depth": 2, "subdomains": 2, "mean_unstable": 2.0, "max_unstable": 2}]
    assert rows_of(synthetic["layers"], "b.onnx") == []      # input splitting records no counts


def test_stats_root_gap_and_root_unstable(synthetic):
    assert rows_of(synthetic["root_gap"], "a.onnx") == [
        {"region": 0, "attack": 1.0, "ibp": -3.0, "crown": -1.0, "alpha": -0.5,
         "gap_ibp": 4.0, "gap_crown": 2.0, "gap_alpha": 1.5}]
    assert rows_of(synthetic["root_gap"], "c.onnx") == [
        {"region": 0, "attack": -0.1, "ibp": -5.0, "crown": -0.5, "alpha": None,
         "gap_ibp": pytest.approx(4.9), "gap_crown": pytest.approx(0.4), "gap_alpha": None}]
    assert rows_of(synthetic["root_unstable"], "a.onnx") == [
        {"region": 0, "layer": 0, "ibp": 4, "crown": 3, "alpha": 3},
        {"region": 0, "layer": 1, "ibp": 6, "crown": 5, "alpha": 4}]
    assert rows_of(synthetic["root_unstable"], "c.onnx") == [{"region": 0, "layer": 0, "ibp": 7, "crown": 2,
                                                              "alpha": None}]


def test_stats_summary_per_run(tmp_path):
    run = read_run(str(write_lines(tmp_path / "synthetic.jsonl", SYNTHETIC)))
    (summary,) = summarise([run], build_tables([run]))
    assert summary["instances"] == 3
    assert summary["verdicts"] == {"unsat": 1, "timeout": 1, "sat": 1}
    assert summary["subdomains"]["mean"] == pytest.approx(8 / 3) and summary["subdomains"]["max"] == 5
    assert summary["max_depth"] == 2
    assert summary["seconds"]["n"] == 2 and summary["seconds"]["mean"] == pytest.approx(1.5)
    assert summary["root_gap"]["ibp"]["median"] == pytest.approx(4.45)
    assert summary["root_gap"]["alpha"] == {"n": 1, "mean": 1.5, "median": 1.5, "min": 1.5, "max": 1.5}
    assert summary["root_unstable"]["crown"]["mean"] == pytest.approx(5.0)   # (3 + 5) and 2


# ---- a real tiny run -----------------------------------------------------------------------------
def tiny_onnx(path: Path, seed: int = 2, hidden=(8, 8)) -> float:
    """A 2-8-8-1 ReLU network as Gemm/Relu nodes; returns the minimum of its output on a grid of
    [-1, 1]^2 (within the grid step's Lipschitz slack of the true minimum)."""
    rng = np.random.default_rng(seed)
    nodes, inits, weights, prev, name = [], [], [], 2, "x"
    sizes = (*hidden, 1)
    for k, h in enumerate(sizes):
        W = (rng.normal(size=(h, prev)) / np.sqrt(prev)).astype(np.float32)
        b = (rng.normal(size=h) * 0.5).astype(np.float32)
        weights.append((W.astype(np.float64), b.astype(np.float64)))
        inits += [numpy_helper.from_array(W, f"W{k}"), numpy_helper.from_array(b, f"b{k}")]
        out = "y" if k == len(sizes) - 1 else f"z{k}"
        nodes.append(helper.make_node("Gemm", [name, f"W{k}", f"b{k}"], [out], transB=1))
        if k < len(sizes) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"a{k}"]))
            name = f"a{k}"
        prev = h
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.stack(np.meshgrid(np.linspace(-1, 1, 401), np.linspace(-1, 1, 401)), -1).reshape(-1, 2)
    for k, (W, b) in enumerate(weights):
        x = x @ W.T + b
        x = np.maximum(x, 0) if k < len(weights) - 1 else x
    return float(x.min())


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Both branch-and-bound modes on one tiny unsat instance that needs a few steps: {split: file}."""
    folder = tmp_path_factory.mktemp("tiny")
    model = folder / "tiny.onnx"
    threshold = tiny_onnx(model) - 0.05
    spec = folder / "tiny.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                    "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"
                    f"(assert (<= Y_0 {threshold!r}))\n")
    files = {}
    for split, name in (("on", "input"), ("off", "relu")):
        files[name] = folder / f"{name}.jsonl"
        assert main(["verify", str(model), str(spec), "--quiet", "--stats", str(files[name]),
                     "--input-split", split, "--timeout", "60"]) == 0
    return files


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_verify_stats_writes_instance_line_then_subdomains(tiny_runs):
    for name, path in tiny_runs.items():
        head, *subdomains = read_jsonl(path)
        assert head["record"] == "instance" and head["result"] == "unsat" and head["seconds"] > 0
        assert head["subdomains"] == len(subdomains) > 1
        assert all(r["record"] == "subdomain" and r["instance_id"] == head["instance_id"] for r in subdomains)
        assert {r["split"] for r in subdomains} == ({"input"} if name == "input" else {"root", "relu"})
        (root,) = head["roots"]
        assert set(root["unstable"]) == {"ibp", "crown", "alpha"}
        # soundness: the attack's margin is attained at a point, every certified bound lies below it
        for method in ("ibp", "crown", "alpha"):
            assert root[method] <= root["attack"] + 1e-5


def test_stats_report_matches_records(tiny_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["stats", str(tiny_runs["relu"]), "--out", str(out)]) == 0
    assert "relu: 1 instance(s) (1 unsat)" in capsys.readouterr().out
    for name in ("summary.json", "instances.csv", "depth.csv", "layers.csv", "root_gap.csv",
                 "root_unstable.csv", "instances.png", "depth.png", "layers.png", "root_gap.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head, *subdomains = read_jsonl(tiny_runs["relu"])
    tables = json.loads((out / "summary.json").read_text())["tables"]
    (inst,) = tables["instances"]["rows"]
    depths = [r["depth"] for r in subdomains]
    assert inst["subdomains"] == len(subdomains) and inst["max_depth"] == max(depths)
    assert inst["mean_depth"] == pytest.approx(np.mean(depths)) and inst["seconds"] == head["seconds"]
    for row in tables["depth"]["rows"]:
        assert row["worst_lower"] == min(r["lower"] for r in subdomains if r["depth"] == row["depth"])
    root_layers = [r for r in tables["layers"]["rows"] if r["depth"] == 0]
    assert [r["mean_unstable"] for r in root_layers] == subdomains[0]["unstable"]
    (gap,) = tables["root_gap"]["rows"]
    assert gap["gap_alpha"] == pytest.approx(head["roots"][0]["attack"] - head["roots"][0]["alpha"])
    with open(out / "depth.csv") as f:
        assert len(list(csv.DictReader(f))) == len(set(depths))


def test_stats_compares_two_runs_side_by_side(tiny_runs, tmp_path):
    out = tmp_path / "both"
    assert main(["stats", str(tiny_runs["input"]), str(tiny_runs["relu"]), "--labels", "dense,pruned",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["dense", "pruned"]
    assert {r["run"] for r in summary["tables"]["instances"]["rows"]} == {"dense", "pruned"}
    with open(out / "depth.csv") as f:
        assert {row["run"] for row in csv.DictReader(f)} == {"dense", "pruned"}
    assert all((out / f"{name}.png").stat().st_size > 0 for name in ("instances", "depth", "layers", "root_gap"))


def test_stats_reads_a_folder_of_record_files(tiny_runs, tmp_path):
    out = tmp_path / "folder"
    assert main(["stats", str(tiny_runs["relu"].parent), "--out", str(out), "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["instances"] == 2 and not list(out.glob("*.png"))


# ---- errors: one line, non-zero exit, no traceback -----------------------------------------------
@pytest.mark.parametrize("content, code, message", [
    (None, 3, "no such file"),
    ("this is not json\n", 3, "not a JSON line"),
    ("\n\n", 3, "no records"),
    ('{"record": "subdomain", "model": "m"}\n', 3, "without a numeric 'depth'"),
    ("[1, 2]\n", 3, "JSON object"),
])
def test_stats_bad_input_is_one_line_error(tmp_path, capsys, content, code, message):
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["stats", str(path), "--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("certiprune stats: error:")
    assert "Traceback" not in err


def test_stats_label_count_must_match_runs(tmp_path, capsys):
    path = write_lines(tmp_path / "a.jsonl", SYNTHETIC)
    assert main(["stats", str(path), "--labels", "dense,pruned", "--out", str(tmp_path / "out")]) == 2
    assert "--labels names 2 run(s), 1 RUN(s) given" in capsys.readouterr().err


def test_stats_empty_folder_is_an_error(tmp_path, capsys):
    assert main(["stats", str(tmp_path), "--out", str(tmp_path / "out")]) == 3
    assert "holds no .jsonl record files" in capsys.readouterr().err


# ---- the figures: integer axes, degenerate runs drawn, runs distinguishable, honest legends -------
@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, by file name."""
    from verifier.stats import plots
    saved = {}

    def keep(fig, path):
        saved[Path(path).name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def draw(tmp_path, records_by_run: dict[str, list[dict]], figures) -> dict:
    from verifier.stats import plots
    runs = [read_run(str(write_lines(tmp_path / f"{label}.jsonl", records)), label)
            for label, records in records_by_run.items()]
    plots.write_plots(build_tables(runs), list(records_by_run), str(tmp_path))
    return figures


def legend_names(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def integer_ticks(axis) -> bool:
    ticks = [t for t in axis.get_majorticklocs() if axis.axes.get_ylim()[0] <= t <= axis.axes.get_ylim()[1]] \
        if axis is axis.axes.yaxis else axis.get_majorticklocs()
    return len(ticks) > 0 and all(float(t).is_integer() for t in ticks)


def test_count_axes_have_integer_ticks_even_for_one_instance(tmp_path, figures):
    one = [SYNTHETIC[0], *SYNTHETIC[1:6]]   # one instance, depths 0..2
    figs = draw(tmp_path, {"one": one}, figures)
    cactus, visited = figs["instances.png"].axes
    assert integer_ticks(cactus.yaxis) and integer_ticks(visited.xaxis)
    worst, closed = figs["depth.png"].axes
    assert integer_ticks(worst.xaxis) and integer_ticks(closed.xaxis)
    root, by_depth = figs["layers.png"].axes
    assert integer_ticks(root.xaxis) and integer_ticks(root.yaxis) and integer_ticks(by_depth.xaxis)


def test_a_run_of_only_timeouts_is_drawn_without_empty_legend_entries(tmp_path, figures):
    timeouts = [dict(r, result="timeout") for r in SYNTHETIC[:6]]
    figs = draw(tmp_path, {"timeouts": timeouts}, figures)
    cactus, visited = figs["instances.png"].axes
    assert legend_names(cactus) == []                 # nothing decided: no curve, no entry
    assert any("no instance decided" in t.get_text() for t in cactus.texts)
    assert cactus.get_xlabel() and integer_ticks(cactus.yaxis)
    assert legend_names(visited) == ["timeouts"] and len(visited.lines) == 1


def test_legend_lists_only_runs_with_data(tmp_path, figures):
    decided = SYNTHETIC[:6]
    undecided = [dict(r, result="timeout", instance_id="T") for r in SYNTHETIC[:1]]   # no subdomains
    figs = draw(tmp_path, {"decided": decided, "undecided": undecided}, figures)
    cactus, _ = figs["instances.png"].axes
    assert legend_names(cactus) == ["decided"]
    worst, closed = figs["depth.png"].axes
    assert legend_names(worst) == legend_names(closed) == ["decided"]


def test_overlapping_runs_differ_in_marker_and_line_style(tmp_path, figures):
    figs = draw(tmp_path, {"dense": SYNTHETIC, "pruned": SYNTHETIC}, figures)   # identical curves
    for name in ("instances.png", "depth.png"):
        for ax in figs[name].axes:
            lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
            if {"dense", "pruned"} <= set(lines):
                a, b = lines["dense"], lines["pruned"]
                assert (a.get_marker(), a.get_linestyle()) != (b.get_marker(), b.get_linestyle()), name


def test_a_zero_root_gap_is_drawn_and_labelled_zero(tmp_path, figures):
    exact = [{"record": "instance", "model": "lin.onnx", "spec": "a.vnnlib", "result": "unsat", "instance_id": "Z",
              "seconds": 0.2, "subdomains": 0, "roots": [{"region": 0, "attack": 0.5, "ibp": 0.1, "crown": 0.5,
                                                          "alpha": 0.5, "unstable": {}}]}]
    figs = draw(tmp_path, {"exact": exact}, figures)
    (ax,) = figs["root_gap.png"].axes
    fig = figs["root_gap.png"]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert any(label.startswith("0 ") for label in labels), labels
    heights = sorted(float(y) for c in ax.collections for _, y in c.get_offsets())
    assert heights[0] == pytest.approx(1e-6) and heights[-1] == pytest.approx(0.4)
