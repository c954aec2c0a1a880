"""onnxadmm: compress ONNX models with ADMM, write them back as ONNX, validate in onnxruntime."""

from .errors import OnnxAdmmError
from .importer.graph import OnnxGraphModule, import_onnx

__version__ = "0.1.0"

__all__ = ["OnnxAdmmError", "OnnxGraphModule", "import_onnx", "__version__"]
