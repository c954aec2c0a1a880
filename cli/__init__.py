"""The ``onnxadmm`` command line (installed as the package ``onnxadmm_cli``)."""
