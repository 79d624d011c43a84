"""``certiprune study CONFIG.toml``: the whole pruning-for-certification pipeline, resumable.

config    frozen dataclasses read from TOML (``load_config``), ``--quick`` variant
pipeline  the stages: train dense per regime, prune × sparsity, measure, export, verify
report    results.csv / results.md, certified-vs-sparsity plots, tightness reports
cli       the subcommand (entry point ``certiprune.commands: study``)
"""
from pruning.study.config import StudyConfig, load_config, parse_config
from pruning.study.pipeline import ModelJob, Study

__all__ = ["ModelJob", "Study", "StudyConfig", "load_config", "parse_config"]
