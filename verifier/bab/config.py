"""Configuration of the branch-and-bound search."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BabConfig:
    input_split: str = "auto"        # "auto": split inputs when the input has <= input_split_max_dim entries
    input_split_max_dim: int = 16
    input_batch: int = 4096          # boxes bounded per step (input splitting)
    relu_batch: int = 256            # domains branched per step (ReLU splitting; 2x children bounded)
    branching: str = "babsr"         # "babsr" or "fsb" (filtered smart branching)
    fsb_candidates: int = 3          # top-k BaBSR candidates evaluated by FSB
    max_domains: int = 500_000       # memory budget: more open domains -> "unknown"
    alpha_iterations: int = 10       # alpha/beta optimisation steps per BaB batch
    # re-bound (CROWN, split multipliers fixed) the intermediate layers after a domain's newest
    # split instead of keeping its parent's bounds there: tighter per domain, but 4x the cost
    # per domain on mnistfc 256x4, which the search measured slower to close (RESULTS.md)
    rebound_intermediate: bool = False
    alpha_lr: float = 0.1
    beta_lr: float = 0.05
    min_box_width: float = 1e-7      # input boxes are not split below this width
    # input splitting also runs wide PGD attacks on the whole box (cheap for few inputs: a
    # counterexample can hide in a region too small for 20 restarts): the first after
    # attack_after seconds of splitting with attack_restarts, each next one 4x wider, taking at
    # most attack_share of the time spent splitting
    attack_after: float = 1.0
    attack_restarts: int = 10_000
    attack_share: float = 0.1
