"""The one exception type of the pruning layer.

``PruningError`` derives from the project's ``VerifierError`` so that the single ``certiprune``
dispatcher turns both families into one line on stderr and a non-zero exit; library code
raises it with a message that names the file, layer or flag at fault.
"""
from verifier.errors import VerifierError


class PruningError(VerifierError):
    """A bad dataset path, model name, sparsity, checkpoint or flag given to the pruning layer."""

    exit_code = 2
