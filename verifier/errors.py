"""The one exception family users can cause, each class of error with its own exit code.

Every ``certiprune`` subcommand (verifier, pruning, benchmarks) exits with one of these codes;
the dispatcher (``verifier.cli.main``) turns any ``VerifierError`` into one line on stderr and
``exit(err.exit_code)``. Library code raises the most precise subclass with a message naming the
file, node, line or flag at fault.

====  =========================  ==========================================================
code  exception / constant       meaning
====  =========================  ==========================================================
0     ``EXIT_OK``                a verdict was printed (sat, unsat, timeout or unknown), or
                                 the command did what it was asked
1     ``EXIT_INTERNAL``          internal error: a bug of certiprune (please report it)
2     ``UsageError``             bad command line, flag value or configuration file key
                                 (argparse's own code for usage errors is 2 as well)
3     ``InputFileError``         a file is missing, unreadable or malformed (model, data,
                                 checkpoint, result or stats file)
4     ``UnsupportedOperatorError``  the model uses an operator the verifier cannot bound
5     ``VnnlibSyntaxError``      the VNN-LIB specification does not parse
6     ``DimensionMismatchError``   specification, input box or data do not fit the model's shapes
7     ``ModelValueError``        the model holds non-finite weights or cannot be evaluated soundly
8     ``DeviceUnavailableError``   the requested device does not exist here (``--device cuda``
                                 without CUDA)
130   ``EXIT_INTERRUPTED``       interrupted (Ctrl-C / SIGINT)
141   ``EXIT_BROKEN_PIPE``       the reader of standard output went away (``| head``); the
                                 command ends quietly, as a shell reports a SIGPIPE death
====  =========================  ==========================================================

A subcommand of another package raises these classes (or its own subclass of one, keeping the
class's code) rather than inventing codes: a dataset or checkpoint that cannot be read is an
``InputFileError`` (3), a bad flag value a ``UsageError`` (2).
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class VerifierError(Exception):
    """Base class of every error caused by the user's input (its code: a usage error)."""

    exit_code = 2


class UsageError(VerifierError):
    """A flag, flag value or configuration-file key is wrong or inconsistent."""

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


class DeviceUnavailableError(VerifierError):
    """The requested torch device does not exist on this machine (e.g. CUDA without a GPU)."""

    exit_code = 8


#: code -> one-line meaning, for ``--help`` epilogues and the README table.
EXIT_CODES = {
    EXIT_OK: "verdict printed / command done",
    EXIT_INTERNAL: "internal error (a bug of certiprune)",
    UsageError.exit_code: "bad command line, flag value or configuration key",
    InputFileError.exit_code: "missing, unreadable or malformed file",
    UnsupportedOperatorError.exit_code: "unsupported operator in the model",
    VnnlibSyntaxError.exit_code: "malformed VNN-LIB specification",
    DimensionMismatchError.exit_code: "specification or data do not fit the model's shapes",
    ModelValueError.exit_code: "model with non-finite weights",
    DeviceUnavailableError.exit_code: "requested device unavailable",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_BROKEN_PIPE: "standard output closed by its reader",
}


def check_device(name: str) -> None:
    """Raise ``DeviceUnavailableError`` (or ``UsageError`` for a malformed name) unless torch can
    place tensors on device ``name`` here; torch is imported only when the name is not ``cpu``."""
    if name == "cpu":
        return
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {name!r} is not a torch device name ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"--device {name}: CUDA is not available on this machine "
                                         f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                         f"device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceUnavailableError(f"--device {name}: device type {device.type!r} is not supported")
