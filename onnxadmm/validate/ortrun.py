"""onnxruntime helpers: sessions, concrete input shapes and example inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import OnnxAdmmError

ORT_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session(model, providers: list[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession from a path or ModelProto (serialized in memory when small)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxAdmmError(f"onnxruntime cannot load the model: {first}") from None


def concrete_shape(dims, batch: int, default_dim: int = 32, override=None) -> list[int]:
    """Replace symbolic/unknown dims: the leading one by ``batch``, the others by ``default_dim``."""
    if override is not None:
        return list(override)
    out = []
    for k, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        else:
            out.append(batch if k == 0 else default_dim)
    return out


def input_specs(sess: ort.InferenceSession) -> list[tuple[str, list, type]]:
    return [(i.name, list(i.shape), ORT_NP_TYPES.get(i.type, np.float32)) for i in sess.get_inputs()]


def fixed_batch_of(specs) -> int | None:
    firsts = {s[1][0] if s[1] and isinstance(s[1][0], int) and s[1][0] > 0 else None for s in specs}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def random_inputs(specs, batch: int, seed: int = 0, shapes: dict | None = None, default_dim: int = 32):
    """Random inputs of the right shape and dtype: floats ~ U(0,1), integers in [0, 10), bools 50/50."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dims, dt in specs:
        shape = concrete_shape(dims, batch, default_dim, (shapes or {}).get(name))
        if np.issubdtype(dt, np.floating):
            feeds[name] = rng.random(shape, dtype=np.float32).astype(dt)
        elif dt == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 10, size=shape).astype(dt)
    return feeds
