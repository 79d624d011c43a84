"""certiprune.verifier: sound bounds (IBP, CROWN, alpha-CROWN) and complete verification of
ReLU networks given as ONNX files or PyTorch modules."""
from .errors import VerifierError

__all__ = ["BoundedModel", "VerifierError", "__version__"]


def __getattr__(name: str):
    # BoundedModel (and with it torch) loads on first use, so that the command line can set
    # torch's threading environment before torch starts (see verifier.cli).
    if name == "BoundedModel":
        from .api import BoundedModel
        return BoundedModel
    if name == "__version__":   # one version, setup.cfg's, as installed
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("certiprune")
        except PackageNotFoundError:   # a source tree that was not installed
            return "0+unknown"
    raise AttributeError(f"module 'verifier' has no attribute {name!r}")
