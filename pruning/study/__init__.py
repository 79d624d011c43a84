"""``certiprune study CONFIG.toml``: the whole pruning-for-certification pipeline, resumable.

config      frozen dataclasses read from TOML (``load_config``), ``--quick`` variant
jobs        bases, tracks, model jobs and the file layout (shared by pipeline and report)
pipeline    the stages, each callable alone: train, prune a round, measure, export, verify,
            re-verify timeouts; ``Study.stages()`` lists them with their dependencies
statistics  Wilson intervals, exact McNemar, Holm, mean ± sd
report      results.csv / results.md / summary.csv with intervals and paired tests
plots       certified accuracy curves with bands, per-image tightness scatter, unstable ReLUs
cli         the subcommand (entry point ``certiprune.commands: study``)
"""
from pruning.study.config import StudyConfig, load_config, parse_config
from pruning.study.jobs import ModelJob
from pruning.study.pipeline import Stage, Study

__all__ = ["ModelJob", "Stage", "Study", "StudyConfig", "load_config", "parse_config"]
