"""Tightness statistics of verification runs: ``certiprune verify --stats`` records in, tables,
a JSON summary, CSVs and PNG plots out (``certiprune stats``).

load    JSON-lines record files -> runs of instances (numpy arrays per instance)
tables  per-instance, per-depth, per-layer and root-gap tables
plots   matplotlib (Agg, no pyplot state) figures of those tables
report  writes summary.json, one CSV per table and the PNGs into a folder
"""
from .load import InstanceRecords, Run, read_run
from .report import write_report
from .tables import Table, build_tables, summarise

__all__ = ["InstanceRecords", "Run", "read_run", "Table", "build_tables", "summarise", "write_report"]
