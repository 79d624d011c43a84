"""The memory budget of CROWN's intermediate passes (``CrownBudget``) and of alpha-CROWN's slopes
(``AlphaConfig.slope_memory_bytes``): chunked rows give the same bounds as one pass; a budget
too small for one row keeps IBP bounds (sound, and logged); alpha-CROWN whose slopes do not fit
drops passes and stays sound and no looser than CROWN."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from conftest import assert_close, assert_contains, assert_le, generator, init_, module_outputs, sample_box
from verifier import BoundedModel
from verifier.bounds.alpha import AlphaConfig, alpha_crown
from verifier.bounds.budget import CrownBudget
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.ops import Bounds


def _conv_net(rng):
    return init_(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                               nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 3)), rng).double()


def _setup(batch: int = 2):
    rng = generator(21)
    module = _conv_net(rng)
    graph = BoundedModel(module, dtype=torch.float64).graph((2, 7, 7))
    center = torch.randn(batch, 2, 7, 7, generator=rng, dtype=torch.float64)
    box = Bounds(center - 0.3, center + 0.3)
    return module, graph, box, rng


def test_chunked_crown_rows_equal_one_pass():
    _, graph, box, _ = _setup(batch=1)
    whole = crown_bounds(graph, box)
    one_row = 2 * max(n.numel for n in graph.nodes) * 8 * CrownBudget().copies   # bytes of two rows
    chunked = crown_bounds(graph, box, budget=CrownBudget(memory_bytes=one_row))
    for i in graph.needs_bounds():
        assert_close(chunked[i].lower, whole[i].lower, torch.float64, f"node {i} lower")
        assert_close(chunked[i].upper, whole[i].upper, torch.float64, f"node {i} upper")


def test_chunked_per_sample_rows_equal_one_pass():
    _, graph, box, _ = _setup(batch=4)
    whole = crown_bounds(graph, box)
    one_row = 4 * max(n.numel for n in graph.nodes) * 8 * CrownBudget().copies   # one row of 4 samples
    chunked = crown_bounds(graph, box, budget=CrownBudget(memory_bytes=one_row))
    for i in graph.needs_bounds():
        assert_close(chunked[i].lower, whole[i].lower, torch.float64, f"node {i} lower")
        assert_close(chunked[i].upper, whole[i].upper, torch.float64, f"node {i} upper")


def test_budget_below_one_row_keeps_ibp_bounds_soundly_and_logs(caplog):
    module, graph, box, rng = _setup(batch=1)
    with caplog.at_level(logging.WARNING, logger="verifier.bounds"):
        starved = crown_bounds(graph, box, budget=CrownBudget(memory_bytes=16))
    assert any("IBP bounds kept" in r.getMessage() for r in caplog.records)
    full = crown_bounds(graph, box)
    C = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    lb, ub = output_bounds(graph, box, C, starved)
    full_lb, full_ub = output_bounds(graph, box, C, full)
    assert_le(lb, full_lb, torch.float64, "starved lower <= full lower")
    assert_le(full_ub, ub, torch.float64, "starved upper >= full upper")
    points = sample_box(box.lower, box.upper, rng)
    assert_contains(lb, ub, module_outputs(module, points), torch.float64, "IBP-fallback bounds")


def test_alpha_crown_over_slope_budget_stays_sound_and_no_looser_than_crown(caplog):
    module, graph, box, rng = _setup(batch=1)
    C = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    crown = crown_bounds(graph, box)
    crown_lb, crown_ub = output_bounds(graph, box, C, crown)
    with caplog.at_level(logging.WARNING, logger="verifier.bounds"):
        lb, ub, _, alphas = alpha_crown(graph, box, C, AlphaConfig(iterations=5, slope_memory_bytes=20_000))
    assert any("exceed" in r.getMessage() for r in caplog.records)
    assert all(key[0] == graph.output for key in alphas), "only the output's pass keeps slopes"
    assert_le(crown_lb, lb, torch.float64, "alpha lower >= crown lower")
    assert_le(ub, crown_ub, torch.float64, "alpha upper <= crown upper")
    points = sample_box(box.lower, box.upper, rng)
    assert_contains(lb, ub, module_outputs(module, points), torch.float64, "alpha-CROWN within budget")
