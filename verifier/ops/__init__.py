"""Bound ops: one file per family, each op with forward / ibp / backward; ``register`` maps
source operators (ONNX op types, torch modules and functions) to them."""
from .activation import ReLU, Sigmoid, Tanh
from .arithmetic import ElementwiseAffine, Sum
from .base import BackwardResult, Bounds, LinearBound, Op, constant
from .linear import AffineMap, Conv2d, ConvTranspose2d, Linear
from .pooling import MaxPool2d
from .registry import register
from .shape import Concat, Rearrange

__all__ = ["AffineMap", "ConvTranspose2d", "BackwardResult", "Bounds", "Concat", "Conv2d", "ElementwiseAffine", "Linear", "LinearBound", "MaxPool2d",
           "Op", "ReLU", "Rearrange", "Sigmoid", "Sum", "Tanh", "constant", "register"]
