"""ADMM compression: configuration, projections, per-layer allocation, the training loop.

The package is also the Python API's entry point: ``onnxadmm.compress(model, output, data, ...)``
calls :func:`onnxadmm.compress.pipeline.compress` (same arguments, same report), so that the
function and the package share the name the CLI gives the command."""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .pipeline import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
