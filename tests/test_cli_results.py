"""What ``certiprune verify`` hands over: the result file written atomically (never a partial or
stale verdict), ``--stats`` records kept when the time runs out (marked as cut), the ``--json``
object, and the order of the phases (cheap bounds before any attack, each attack within its
share of the time)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import verifier.output
import verifier.verify
from cli_nets import hard_unsat, ibp_provable_classifier
from verifier.attack import AttackConfig
from verifier.cli import main

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "test"


def verify_args(model, spec, *flags) -> list[str]:
    return ["verify", str(model), str(spec), "--threads", "1", *flags]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- 1. the result file -------------------------------------------------------------------------
@pytest.fixture
def replace_spy(monkeypatch):
    """Records every os.replace of the result writer with what the target and the temporary file
    held at that moment."""
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append({"dst": str(dst), "old": Path(dst).read_text() if Path(dst).exists() else None,
                     "new": Path(src).read_text(), "same_folder": Path(src).parent == Path(dst).parent})
        real(src, dst)

    monkeypatch.setattr(verifier.output.os, "replace", spy)
    return seen


def test_result_file_replaces_a_stale_verdict_in_one_step(tmp_path, replace_spy):
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")   # a stale verdict of an earlier run
    assert main(verify_args(DATA / "test_sat.onnx", DATA / "test_prop.vnnlib", "--timeout", "60", "-q",
                            "--result-file", str(result))) == 0
    text = result.read_text()
    assert text.startswith("sat\n(") and text.endswith(")\n")
    # until the rename the reader saw the old verdict whole; the new one arrived whole, by rename
    assert replace_spy == [{"dst": str(result), "old": "unsat\n", "new": text, "same_folder": True}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]   # no temporary file left


def test_error_result_is_written_atomically_over_a_stale_verdict(tmp_path, replace_spy, capsys):
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")
    code = main(verify_args(tmp_path / "missing.onnx", DATA / "test_prop.vnnlib", "--result-file", str(result)))
    assert code == 3
    assert result.read_text() == "error\n"
    assert [(s["old"], s["new"]) for s in replace_spy] == [("unsat\n", "error\n")]
    assert "missing.onnx" in capsys.readouterr().err


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "result.txt"
    target.write_text("unsat\n")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(verifier.output.os, "fsync", fail)
    with pytest.raises(OSError):
        verifier.output.write_atomic(str(target), "sat\n(...)\n")
    assert target.read_text() == "unsat\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


# ---- 2. --stats when the run is cut -------------------------------------------------------------
def test_stats_kept_and_marked_cut_when_the_safety_net_interrupts_a_step(tmp_path, monkeypatch, capsys):
    """A bounding step that overruns the deadline is interrupted by the wall-clock alarm; what the
    run recorded until then is written, the instance line says why it was cut."""
    stats = tmp_path / "stats.jsonl"

    def overrunning_verify(model, prop, config, log, records):
        root = records.root(0)
        root.ibp, root.crown, root.alpha = -3.0, -1.5, -1.0   # as a search's root would have them
        records.add(records.new_ids(3), torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 1]),
                    torch.tensor([-1.5, -0.5, 0.25]), None, "relu")
        time.sleep(60)   # a step that never returns: only the alarm ends it
        raise AssertionError("the safety net did not fire")

    monkeypatch.setattr(verifier.verify, "verify", overrunning_verify)
    code = main(verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", "--timeout", "0.3",
                            "--stats", str(stats)))
    assert code == 0
    assert capsys.readouterr().out.split()[0] == "timeout"
    instance, *subdomains = lines_of(stats)
    assert instance["record"] == "instance" and instance["result"] == "timeout"
    assert instance["cut"] is True and "safety net" in instance["cut_reason"]
    assert instance["subdomains"] == 3
    assert {m: instance["roots"][0][m] for m in ("ibp", "crown", "alpha")} == {"ibp": -3.0, "crown": -1.5,
                                                                              "alpha": -1.0}
    assert [s["lower"] for s in subdomains] == [-1.5, -0.5, 0.25]


def test_stats_kept_and_marked_cut_when_the_deadline_ends_the_search(tmp_path, capsys):
    model, spec = hard_unsat(tmp_path)
    stats = tmp_path / "stats.jsonl"
    assert main(verify_args(model, spec, "--timeout", "3", "--stats", str(stats), "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "timeout" and out["reason"]
    instance, *subdomains = lines_of(stats)
    assert instance["result"] == "timeout" and instance["cut"] is True and instance["cut_reason"]
    assert instance["subdomains"] == len(subdomains) == out["subdomains"]
    assert instance["roots"][0]["ibp"] is not None   # the root bounds gathered are all there


def test_stats_of_a_verdict_is_not_marked_cut(tmp_path):
    stats = tmp_path / "stats.jsonl"
    assert main(verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", "-q", "--stats", str(stats))) == 0
    instance = lines_of(stats)[0]
    assert instance["cut"] is False and instance["cut_reason"] is None


# ---- 8. --json ----------------------------------------------------------------------------------
def test_json_output_of_a_sat_verdict_holds_a_counterexample_onnxruntime_confirms(capsys):
    import numpy as np
    import onnxruntime as ort
    assert main(verify_args(DATA / "test_sat.onnx", DATA / "test_prop.vnnlib", "--json", "-q")) == 0
    out = json.loads(capsys.readouterr().out)   # stdout is exactly one JSON object
    assert set(out) >= {"verdict", "seconds", "counterexample", "subdomains", "reason", "root_bounds", "phases"}
    assert out["verdict"] == "sat" and out["reason"] is None and out["seconds"] > 0
    session = ort.InferenceSession(str(DATA / "test_sat.onnx"))
    feed = session.get_inputs()[0]
    x = np.array(out["counterexample"]["x"], dtype=np.float32).reshape([d if isinstance(d, int) else 1
                                                                      for d in feed.shape])
    np.testing.assert_allclose(session.run(None, {feed.name: x})[0].reshape(-1), out["counterexample"]["y"],
                               rtol=1e-5, atol=1e-6)


def test_json_output_of_an_incomplete_run_says_why_it_is_unknown(tmp_path, capsys):
    model, spec = hard_unsat(tmp_path)
    assert main(verify_args(model, spec, "--json", "-q", "--no-bab")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "unknown" and "no branch and bound" in out["reason"]
    assert out["counterexample"] is None
    root = out["root_bounds"][0]
    assert root["ibp"] < 0 and root["crown"] <= root["alpha"] < 0   # none proves it; alpha >= CROWN


# ---- 3. cheap bounds before attacks; attacks within their share ---------------------------------
def load(model: Path, spec: Path):
    from verifier import BoundedModel
    from verifier.io.vnnlib import load_vnnlib
    bounded = BoundedModel(str(model))
    graph = bounded.graph()
    return bounded, load_vnnlib(str(spec), n_inputs=graph.nodes[0].numel, n_outputs=graph.nodes[graph.output].numel)


@pytest.fixture
def attack_calls(monkeypatch):
    """Every call of the attack before the search: (seconds it was given, restarts)."""
    calls = []
    real = verifier.verify.pgd_search

    def spy(forward, spec, config, deadline=None, starts=None):
        calls.append((deadline - time.monotonic(), config.restarts))
        return real(forward, spec, config, deadline, starts)

    monkeypatch.setattr(verifier.verify, "pgd_search", spy)
    return calls


def test_a_property_interval_bounds_prove_is_decided_without_any_attack(tmp_path, attack_calls):
    """19 disjuncts and an attack of 10^4 restarts x 10^4 steps, which would take the whole
    budget: the verdict comes from IBP, and the attack never starts."""
    model, spec = ibp_provable_classifier(tmp_path)
    bounded, prop = load(model, spec)
    config = verifier.verify.VerifyConfig(timeout=60, attack=AttackConfig(restarts=10_000, steps=10_000))
    result = verifier.verify.verify(bounded, prop, config)
    assert result.status == "unsat"
    assert attack_calls == []
    assert set(result.records.phases) == {"ibp"}
    assert result.records.roots[0].ibp > 0


def test_the_attack_before_the_search_gets_its_share_of_the_time_left(tmp_path, attack_calls):
    """A property the root bounds do not prove: IBP and CROWN run first, then the attack within
    ``time_share`` of what is left (the deadline it is given, not a wall-time measurement)."""
    model, spec = hard_unsat(tmp_path)
    bounded, prop = load(model, spec)
    share, timeout = 0.05, 30.0
    config = verifier.verify.VerifyConfig(timeout=timeout, complete=False,
                                          attack=AttackConfig(restarts=200, steps=10_000, time_share=share))
    result = verifier.verify.verify(bounded, prop, config)
    assert result.status == "unknown"
    assert len(attack_calls) == 1
    given, restarts = attack_calls[0]
    assert restarts == 200 and 0 < given <= share * timeout
    assert list(result.records.phases)[:3] == ["ibp", "crown", "attack"]


def test_each_region_gets_a_part_of_the_attack_share(tmp_path, attack_calls):
    """Two regions (the two halves of the box) left open by the bounds: both are attacked, and
    the attacks together stay within one share."""
    from cli_nets import box_spec
    model, _ = hard_unsat(tmp_path)
    declarations = box_spec(tmp_path / "d.vnnlib", 24, 1, -1, 1, "").read_text().split("(assert")[0]
    regions = " ".join("(and " + " ".join(f"(>= X_{i} {lo}) (<= X_{i} {lo + 1})" for i in range(24)) + ")"
                       for lo in (-1, 0))
    spec = tmp_path / "two.vnnlib"
    spec.write_text(declarations + f"(assert (or {regions}))\n(assert (>= Y_0 0.0001))\n")
    bounded, prop = load(model, spec)
    assert len(prop.regions) == 2
    share, timeout = 0.1, 20.0
    config = verifier.verify.VerifyConfig(timeout=timeout, complete=False,
                                          attack=AttackConfig(restarts=50, steps=100_000, time_share=share))
    assert verifier.verify.verify(bounded, prop, config).status == "unknown"
    assert len(attack_calls) == 2
    assert sum(given for given, _ in attack_calls) <= share * timeout


def test_json_output_of_a_user_error_is_one_error_object(tmp_path, capsys):
    assert main(verify_args(tmp_path / "missing.onnx", DATA / "test_prop.vnnlib", "--json", "-q")) == 3
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["verdict"] == "error" and out["exit_code"] == 3 and "missing.onnx" in out["error"]
    assert "missing.onnx" in captured.err
