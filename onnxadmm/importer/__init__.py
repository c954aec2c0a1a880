"""ONNX -> torch importer."""
