"""Export: write compressed weights back into the original ONNX graph."""

from .writer import FLOAT_TYPES, export_onnx, initializer_values

__all__ = ["FLOAT_TYPES", "export_onnx", "initializer_values"]
