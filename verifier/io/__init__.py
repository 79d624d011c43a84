"""File formats: ONNX models (onnx.py, convert.py) and VNN-LIB properties (vnnlib.py)."""
