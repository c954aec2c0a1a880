"""Errors raised by onnxadmm. Every message is one line a user can act on."""


class OnnxAdmmError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits non-zero."""


class ModelLoadError(OnnxAdmmError):
    """The file is missing, is not ONNX, is truncated, or refers to unsafe external data."""


class UnsupportedModelError(OnnxAdmmError):
    """The model uses operators (or constructs) the importer does not implement."""


class DataError(OnnxAdmmError):
    """Input data do not match the model (name, shape, dtype) or cannot be read."""


class ConfigError(OnnxAdmmError):
    """A command-line option or configuration value is invalid."""


class NothingToCompressError(OnnxAdmmError):
    """The model holds no tensor weights that onnxadmm can compress."""
