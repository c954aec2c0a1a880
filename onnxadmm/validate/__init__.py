"""Validation in onnxruntime: inspect, verify, evaluate."""
