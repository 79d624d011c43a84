"""The pruning layer's exceptions, on the project's exit-code scheme (``verifier.errors``: the
table of codes every ``certiprune`` subcommand shares).

- ``PruningError`` (2, a ``UsageError``): a bad flag, flag value, configuration key, model or
  method name, sparsity, or an impossible request (a fraction that empties a layer);
- ``PruningFileError`` (3, also an ``InputFileError``): a dataset, checkpoint or study
  configuration that is missing, unreadable or malformed.

``pruning.cli`` and ``certiprune study`` turn them into one line on stderr and their code;
library code raises them with a message that names the file, layer or flag at fault.
"""
from verifier.errors import InputFileError, UsageError


class PruningError(UsageError):
    """A bad dataset name, model name, sparsity, schedule or flag given to the pruning layer."""

    exit_code = 2


class PruningFileError(PruningError, InputFileError):
    """A dataset file, checkpoint or study configuration is missing, unreadable or malformed."""

    exit_code = 3
