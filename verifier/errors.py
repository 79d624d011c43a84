"""The one exception family users can cause, each kind with its own exit code.

The CLI turns any ``VerifierError`` into one line on stderr and ``exit(err.exit_code)``;
library code raises the most precise subclass with a message naming the file, node or line.
"""


class VerifierError(Exception):
    """Base class of every error caused by the user's input."""

    exit_code = 2


class InputFileError(VerifierError):
    """A file is missing, unreadable, or not of the expected format (e.g. non-ONNX bytes)."""

    exit_code = 3


class UnsupportedOperatorError(VerifierError):
    """The model uses an operator (or an attribute of one) that the verifier cannot bound."""

    exit_code = 4


class VnnlibSyntaxError(VerifierError):
    """A VNN-LIB file does not parse; the message carries the file and line."""

    exit_code = 5


class DimensionMismatchError(VerifierError):
    """A specification, input box or spec matrix does not fit the model's shapes."""

    exit_code = 6


class ModelValueError(VerifierError):
    """The model holds non-finite weights or otherwise cannot be evaluated soundly."""

    exit_code = 7
