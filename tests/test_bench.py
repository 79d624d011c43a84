"""The suite runner's bookkeeping (benchmarks/bench.py): result files kept next to the CSV, the
score of the current VNN-COMP rules, the side-by-side comparison, shards, and one row per
instance (an old CSV upgraded, a second row for an instance refused)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from benchmarks import bench
from benchmarks.instances import Instance, read_instances

ROOT = Path(__file__).resolve().parent.parent
TEST_SUITE = ROOT / "benchmarks" / "data" / "test" / "test_instances.csv"


def row(key, result, seconds, timeout=60.0):
    return {"benchmark": key[0], "onnx": key[1], "vnnlib": key[2], "result": result, "seconds": str(seconds),
            "timeout": str(timeout)}


def inst(name: str, bench_name: str = "b") -> Instance:
    return Instance(bench_name, f"{name}.onnx", "p.vnnlib", 60.0, "", "")


def test_bench_keeps_every_result_file_with_its_counterexample(tmp_path):
    out = tmp_path / "runs" / "test.csv"
    code = bench.main([str(TEST_SUITE), "--every", "3", "--out", str(out), "--threads", "1",
                       "--reference", str(ROOT / "benchmarks" / "data" / "REFERENCE.csv")])
    assert code == 0
    rows = bench.read_results(str(out))
    assert {k[1]: r["result"] for k, r in rows.items()} == {"test_nano.onnx": "unsat", "test_sat.onnx": "sat"}
    assert all(r["mode"] == "isolated" for r in rows.values())
    sat_file = tmp_path / "runs" / "test.results" / "test" / "test_sat__test_prop.txt"
    text = sat_file.read_text()
    assert text.startswith("sat\n(") and "(X_0 " in text and "(Y_0 " in text
    assert (tmp_path / "runs" / "test.results" / "test" / "test_nano__test_nano.txt").read_text() == "unsat\n"


def test_kept_result_file_of_a_killed_run_says_what_the_row_says(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("unsat\n")   # stale
    bench.keep_result_file(path, bench.Outcome("killed", 70.0, -9, ""))
    assert path.read_text() == "killed\n"
    bench.keep_result_file(path, bench.Outcome("error", 1.0, 1, "sat\n(X_0 1.0)"))   # a verdict of a failed run
    assert path.read_text() == "error\n"


def test_summary_scores_plus_10_per_correct_and_minus_150_per_wrong():
    instances = [inst("a"), inst("b"), inst("c"), inst("d")]
    rows = {instances[0].key: row(instances[0].key, "unsat", 1.0), instances[1].key: row(instances[1].key, "sat", 2.0),
            instances[2].key: row(instances[2].key, "sat", 3.0), instances[3].key: row(instances[3].key, "unsat", 99.0)}
    reference = {instances[0].key: "unsat", instances[1].key: "sat", instances[2].key: "unsat",
                 instances[3].key: "unsat"}
    text, wrong = bench.summarise(instances, rows, reference)
    assert wrong == 1
    header, line = text.splitlines()[:2]
    fields = dict(zip(header.split()[-4:], line.split()[-4:]))
    # 2 correct in time, 1 wrong, 1 late (unsolved): 2 * 10 - 150
    assert fields == {"correct": "2", "wrong": "1", "unsolved": "1", "score": str(2 * 10 - 150)}


def test_compare_counts_solved_wrong_and_the_geometric_mean_of_time_ratios():
    instances = [inst(n) for n in "abcde"]
    k = [i.key for i in instances]
    mine = {k[0]: row(k[0], "unsat", 2.0), k[1]: row(k[1], "unsat", 1.0), k[2]: row(k[2], "timeout", 60.0),
            k[3]: row(k[3], "sat", 4.0)}
    other = {k[0]: row(k[0], "unsat", 1.0), k[1]: row(k[1], "unsat", 4.0), k[2]: row(k[2], "unsat", 10.0),
             k[3]: row(k[3], "unsat", 1.0), k[4]: row(k[4], "unsat", 1.0)}
    reference = {k[0]: "unsat", k[1]: "unsat", k[2]: "unsat", k[3]: "unsat"}
    line = bench.compare(instances, mine, other, ("A", "B"), reference).splitlines()[1].split()
    # both run: a-d; solved A: a, b, d; solved B: a-d; wrong A: d; both solved: a, b, d
    geomean = math.exp((math.log(2.0 / 1.0) + math.log(1.0 / 4.0) + math.log(4.0 / 1.0)) / 3)
    assert line[:7] == ["b", "4", "3", "4", "1", "0", "3"]
    assert float(line[7]) == pytest.approx(geomean, abs=1e-3)
    # without a reference, 'wrong' counts opposite verdicts (d: sat against unsat), on both sides
    line = bench.compare(instances, mine, other, ("A", "B"), None).splitlines()[1].split()
    assert line[4:6] == ["1", "1"]


def test_bench_summary_with_compare_prints_both_tables(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path, seconds in ((a, 1.0), (b, 4.0)):
        writer = bench.ResultWriter(str(path))
        writer.record(inst("x"), 60.0, bench.Outcome("unsat", seconds, 0, "unsat\n"), "abc")
    assert bench.main(["--summary", "--out", str(a), "--compare", str(b)]) == 0
    out = capsys.readouterr().out
    assert "geomean t(A)/t(B)" in out and "0.250" in out


def test_shards_partition_the_selected_instances():
    instances = [inst(str(i)) for i in range(10)]
    shards = [bench.select(instances, 1, None, (i, 3)) for i in range(3)]
    assert sorted((i.onnx for s in shards for i in s), key=lambda n: int(n.split(".")[0])) == \
        [i.onnx for i in instances]
    assert [i.onnx for i in shards[1]] == ["1.onnx", "4.onnx", "7.onnx"]
    assert bench.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/3", "1", "a/b"):
        with pytest.raises(ValueError):
            bench.parse_shard(bad)


def test_result_writer_records_one_row_per_instance_and_upgrades_an_old_csv(tmp_path):
    path = tmp_path / "old.csv"
    old_fields = bench.FIELDS[:9]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, old_fields)
        writer.writeheader()
        writer.writerow({**row(inst("a").key, "unsat", 1.0), "exit_code": 0, "commit": "x", "finished_at": "t"})
    writer = bench.ResultWriter(str(path))
    assert writer.record(inst("a"), 60.0, bench.Outcome("sat", 1.0, 0), "y") is False   # already in the file
    assert writer.record(inst("b"), 60.0, bench.Outcome("unsat", 1.0, 0, "unsat\n", "warm", "w1"), "y") is True
    assert writer.record(inst("b"), 60.0, bench.Outcome("unsat", 1.0, 0), "y") is False
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["onnx"], r["result"], r["mode"], r["worker"]) for r in rows] == \
        [("a.onnx", "unsat", "isolated", ""), ("b.onnx", "unsat", "warm", "w1")]


def test_read_instances_of_the_shipped_test_suite():
    instances = read_instances(TEST_SUITE)
    assert len(instances) == 5 and {i.benchmark for i in instances} == {"test"}
