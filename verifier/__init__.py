"""certiprune.verifier: sound bounds (IBP, CROWN, alpha-CROWN) and complete verification of
ReLU networks given as ONNX files or PyTorch modules."""
from .api import BoundedModel
from .errors import VerifierError

__all__ = ["BoundedModel", "VerifierError"]
