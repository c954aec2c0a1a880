"""onnxadmm: compress ONNX models with ADMM, write them back as ONNX, validate in onnxruntime."""

from . import compress  # callable: onnxadmm.compress(model, output, data, ...) runs the pipeline
from .compress.config import CompressConfig
from .errors import OnnxAdmmError
from .importer.graph import OnnxGraphModule, import_onnx

__version__ = "0.1.0"

__all__ = ["CompressConfig", "OnnxAdmmError", "compress", "OnnxGraphModule", "import_onnx", "__version__"]
