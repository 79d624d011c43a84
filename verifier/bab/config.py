"""Configuration of the branch-and-bound search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GeneralSplitConfig:
    """Branch and bound on general non-linearities (``bab/general_split.py``), used where the
    graph has a splittable op other than ReLU."""

    batch: int = 64                  # domains branched per step (2x children bounded)
    alpha_iterations: int = 10       # multiplier (and ReLU slope) optimisation steps per batch
    beta_lr: float = 0.05
    min_width: float = 1e-5          # a neuron's interval is not split below this width
    # children re-bound their intermediate layers after the split by CROWN (else interval
    # propagation from the split, intersected with the parent's bounds)
    rebound: bool = True


@dataclass(frozen=True)
class BabConfig:
    input_split: str = "auto"        # "auto": split inputs when the input has <= input_split_max_dim entries
    input_split_max_dim: int = 16
    input_batch: int = 4096          # boxes bounded per step (input splitting)
    # input splitting: alpha-CROWN steps (and their Adam step) on the boxes CROWN leaves open;
    # 0 = CROWN only. ACAS Xu 3_3 prop_2 / 4_2 prop_2 in seconds (boxes): CROWN only timeout
    # (> 7 M) / 19.1 (261 k); 2 steps 6.2 / 4.4; 5 steps 6.3 (21.9 k) / 4.6 (10.5 k); 10 steps
    # 8.0 / 5.5; lr 1.6 worse at each (RESULTS.md)
    input_alpha_iterations: int = 5
    input_alpha_lr: float = 0.5
    input_alpha_after: float = 1.0   # seconds of CROWN-only splitting first (1_1 prop_5: 0.9 s, not 1.4 s)
    relu_batch: int = 256            # domains branched per step (ReLU splitting; 2x children bounded)
    # a step longer than this halves the batch: the deadline is checked between steps (and
    # between layers of a re-bounding), so a timeout is honoured to within about a step
    max_step_seconds: float = 2.0
    # "babsr", "fsb" (filtered smart branching), "layer" (the earliest layer with an unstable
    # neuron, BaBSR's best within it), or "auto": "layer" when at the root the first ReLU layer
    # is at most half unstable and a later one has at least layer_branching_unstable of its
    # neurons unstable, else "babsr". There the intermediate bounds have blown up (mnistfc 256x6
    # at eps 0.03: root margins of -150 to -460, the last two layers 256/256 unstable, while
    # sampled pre-activations never cross 0), and only splits near the input followed by
    # re-bounding the layers after them can close it.
    # The later-layer share: 256x4 prop_9_0.03 (root layers 43/79/35/205 of 256 unstable, 0.80)
    # is unsat in 292 s in the layer order and a timeout in BaBSR (worst bound -0.66 at 300 s),
    # while where BaBSR already decides (later layers at most 0.32 unstable) it is the faster:
    # prop_10_0.05 10.5 s against 55.9 s, prop_3_0.03 55 s against > 86 s (RESULTS.md)
    branching: str = "auto"
    layer_branching_unstable: float = 0.75
    # "auto" where it picks "layer": BaBSR (intermediate bounds kept) gets this share of the time
    # left first, then the search restarts from the root in the layer order. BaBSR finds the
    # counterexamples near the root in seconds (256x4 prop_1_0.05: sat in 1.2 s), which the
    # layer order's slow first steps missed for 300 s; on 256x6 prop_5_0.03 (nine disjuncts)
    # each BaBSR phase costs its share: unsat in 114 s with 0.03, 44 s in the layer order alone
    auto_babsr_share: float = 0.01
    fsb_candidates: int = 3          # top-k BaBSR candidates evaluated by FSB
    max_domains: int = 500_000       # memory budget: more open domains -> "unknown"
    alpha_iterations: int = 10       # alpha/beta optimisation steps per BaB batch
    # further steps for the children still below their parent's bound after those (0: none),
    # with a smaller step for the slopes: they refine a warm start rather than explore. Without
    # them, subtrees of 256x4 prop_4_0.05 stayed below an ancestor's bound of -0.023 for 200 s
    # (50 more steps at 0.2 prove 49 of 64 such domains); with them that instance is unsat in
    # 162 s, at the price of slower easy searches (prop_10_0.05 29 s against 10; RESULTS.md)
    catch_up_iterations: int = 50
    catch_up_lr: float = 0.2
    # Intermediate bounds of a child: its parent's, with the split neuron clamped and the layers
    # after it tightened by interval propagation from there (intersected with the parent's).
    # rebound_intermediate also re-bounds those layers by CROWN (split multipliers fixed):
    # tighter per domain, but 4x the cost of a domain on mnistfc 256x4, and measured slower to
    # close the search (RESULTS.md, "Engine changes of 2026-11-25")
    # None: on with "layer" branching, off otherwise
    rebound_intermediate: Optional[bool] = None
    # re-bounding passes take the lower slopes alpha-CROWN optimised for the root's intermediate
    # bounds (any slope in [0, 1] is sound) instead of CROWN's choice: on 256x4 prop_6_0.05,
    # children split on 10 first-layer neurons have 40 third-layer neurons unstable against 69
    # (RESULTS.md)
    rebound_with_root_slopes: bool = True
    # Adam's step for the slopes: large, so that a few steps reach the best corner of [0, 1]
    # (the bound is linear in each last-layer slope); measured on mnistfc 256x4 prop_10_0.05:
    # 0.05 / 0.1 / 0.2 / 0.4 / 0.8 / 1.6 / 3.2 -> 356k / 161k / 79k / 41k / 31k / 12.8k / 16.8k
    # subdomains to unsat (RESULTS.md)
    alpha_lr: float = 1.6
    beta_lr: float = 0.05
    min_box_width: float = 1e-7      # input boxes are not split below this width
    # both searches also run PGD attacks on the whole box (bab/attacks.py): the first after
    # attack_after seconds of search, each next one 4x wider. Input splitting starts at
    # attack_restarts (cheap for few inputs: a counterexample can hide in a region too small for
    # 20 restarts) and gives them at most attack_share of its time; ReLU splitting starts at
    # relu_attack_restarts, the first relu_attack_starts of them from the most promising points
    # of the open domains (their linear bounds' minimisers with the lowest concrete margins),
    # and gives them relu_attack_share: on mnistfc they have found nothing the search did not,
    # and a tenth of the time made the searches near the timeout 14-20 % slower (RESULTS.md)
    attack_after: float = 1.0
    attack_restarts: int = 10_000
    attack_share: float = 0.1
    relu_attack_restarts: int = 64
    relu_attack_starts: int = 32
    relu_attack_share: float = 0.05
    general: GeneralSplitConfig = GeneralSplitConfig()
