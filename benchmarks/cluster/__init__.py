"""Running suites on Dask distributed (``certiprune bench --workers N | --scheduler ADDR``).

* ``worker``: what runs on a Dask worker: a warm verification (torch imported once, converted
  models kept by file hash, the timeout enforced inside the search) or one fresh verifier process
  per instance (``--isolate``).
* ``runner``: the client side: a local cluster or an existing one, one task per instance, one
  CSV row per instance as it finishes, a worker restarted when its instance overruns timeout +
  grace, an ``error`` row for an instance whose worker keeps dying.
* ``vnncomp`` / ``handoff``: VNN-COMP's untimed ``prepare_instance.sh`` may start a warm worker,
  ``run_instance.sh`` hands the instance to it and writes the result file itself.

This package imports neither torch nor the verifier at module level: the client of a run (and
the hand-off of a timed VNN-COMP run) stays light; the workers import them once.
"""
