"""Bound ops: one file per family, each op with forward / ibp / backward."""
from .activation import ReLU, Sigmoid, Tanh
from .arithmetic import ElementwiseAffine, Sum
from .base import BackwardResult, Bounds, Op, constant
from .linear import Conv2d, Linear
from .pooling import MaxPool2d
from .shape import Concat, Rearrange

__all__ = ["BackwardResult", "Bounds", "Concat", "Conv2d", "ElementwiseAffine", "Linear", "MaxPool2d",
           "Op", "ReLU", "Rearrange", "Sigmoid", "Sum", "Tanh", "constant"]
