"""Datasets for compress/evaluate/verify: .npz files, folders of .npy files, built-in ``digits``.

Arrays are named after the model's inputs (a single-input model may use one array ``x``); an
optional label array is ``y`` or ``labels``. Data come in the model's own input format; for raw
images, ``scale``/``mean``/``std``/``layout`` convert them: x' = (x * scale - mean) / std, with
``mean``/``std`` per channel, and ``layout`` naming the data's layout (nchw or nhwc) so that it is
transposed to the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

LABEL_NAMES = ("y", "labels", "label")
BUILTIN = ("digits",)


@dataclass
class InputSpec:
    name: str
    shape: list  # ints for fixed dims, str/None for symbolic
    dtype: np.dtype


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, idx) -> Dataset:
        return Dataset(
            {k: v[idx] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[idx],
            self.source,
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """(train, held-out) with ``fraction`` of the samples held out, shuffled with ``seed``."""
        n = len(self)
        idx = np.random.default_rng(seed).permutation(n)
        k = max(1, int(round(n * fraction)))
        if k >= n:
            raise DataError(f"cannot hold out {fraction:.0%} of {n} samples for validation")
        return self.subset(np.sort(idx[k:])), self.subset(np.sort(idx[:k]))


def input_specs_of(model) -> list[InputSpec]:
    """InputSpecs for the real inputs of an ONNX model (ModelProto)."""
    import onnx

    from .importer.analysis import graph_inputs

    out = []
    for vi in graph_inputs(model.graph):
        t = vi.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in t.shape.dim
        ]
        out.append(InputSpec(vi.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return out


def _digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return {"x": (d.images.astype(np.float32) / 16.0), "y": d.target.astype(np.int64)}


def _read(source) -> dict[str, np.ndarray]:
    if isinstance(source, dict):
        return {k: np.asarray(v) for k, v in source.items()}
    if str(source) in BUILTIN:
        return _digits()
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected .npz, a folder of .npy, or 'digits')")
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"{path}: folder holds no .npy files")
        return {f.stem: np.load(f, allow_pickle=False) for f in files}
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.ndarray):
            raise DataError(f"{path}: a single .npy array; use an .npz with arrays named after the inputs")
        with z:
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from None


def _model_layout(shape) -> str | None:
    if len(shape) != 4:
        return None
    c1, c3 = shape[1], shape[3]
    if isinstance(c1, int) and c1 in (1, 3, 4) and not (isinstance(c3, int) and c3 in (1, 3, 4)):
        return "nchw"
    if isinstance(c3, int) and c3 in (1, 3, 4):
        return "nhwc"
    return None


def _fit(name: str, x: np.ndarray, spec: InputSpec, layout: str | None) -> np.ndarray:
    want = spec.shape
    if layout and x.ndim == 4:
        model_layout = _model_layout(want)
        if model_layout and layout != model_layout:
            x = x.transpose(0, 3, 1, 2) if layout == "nhwc" else x.transpose(0, 2, 3, 1)
    if len(want) == x.ndim and all(not isinstance(w, int) or w == s for w, s in zip(want[1:], x.shape[1:])):
        return x
    fixed = [w for w in want[1:] if isinstance(w, int)]
    if len(fixed) == len(want) - 1 and fixed and int(np.prod(fixed)) == int(np.prod(x.shape[1:])):
        same_nontrivial = [d for d in fixed if d != 1] == [d for d in x.shape[1:] if d != 1]
        if same_nontrivial or len([d for d in fixed if d != 1]) == 1:
            return x.reshape([len(x)] + fixed)
    raise DataError(
        f"input {name!r}: data have per-sample shape {list(x.shape[1:])}, the model expects {want[1:]} "
        f"(full shape {want}); use --layout to transpose images"
    )


def load_data(
    source,
    specs: Sequence[InputSpec],
    *,
    scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str | None = None,
    limit: int | None = None,
) -> Dataset:
    """Read ``source`` and shape it to the model's inputs (name, shape, dtype), with clear errors."""
    arrays = _read(source)
    labels = None
    for k in LABEL_NAMES:
        if k in arrays and k not in {s.name for s in specs}:
            labels = np.asarray(arrays.pop(k))
            break
    inputs: dict[str, np.ndarray] = {}
    if len(specs) == 1 and specs[0].name not in arrays:
        rest = list(arrays)
        if "x" in arrays:
            arrays = {specs[0].name: arrays["x"]}
        elif len(rest) == 1:
            arrays = {specs[0].name: arrays[rest[0]]}
        else:
            raise DataError(
                f"data must hold an array named {specs[0].name!r} (or 'x') of shape {specs[0].shape}; "
                f"found {', '.join(rest) or 'none'}"
            )
    for s in specs:
        if s.name not in arrays:
            raise DataError(
                f"data lack input {s.name!r} (expected shape {s.shape}); arrays found: {', '.join(arrays) or 'none'}"
            )
        x = np.asarray(arrays[s.name])
        if x.ndim == 0:
            raise DataError(f"input {s.name!r}: a scalar array; expected shape {s.shape}")
        if x.dtype.kind not in "fiub":
            raise DataError(
                f"input {s.name!r}: data of type {x.dtype} cannot feed the model "
                f"(expects {np.dtype(s.dtype).name} of shape {s.shape})"
            )
        if np.issubdtype(s.dtype, np.floating):
            x = x.astype(np.float32)
            if scale is not None:
                x = x * np.float32(scale)
            if mean is not None or std is not None:
                x = _normalise(x, mean, std, layout or _model_layout(s.shape) or "nchw")
        elif x.dtype.kind not in "iub":
            raise DataError(
                f"input {s.name!r}: model expects {np.dtype(s.dtype).name} of shape {s.shape}, data are {x.dtype}"
            )
        x = _fit(s.name, x, s, layout).astype(s.dtype, copy=False)
        inputs[s.name] = np.ascontiguousarray(x)
    n = {len(v) for v in inputs.values()}
    if len(n) != 1:
        raise DataError(
            f"inputs have different numbers of samples: { {k: len(v) for k, v in inputs.items()} }"
        )
    if labels is not None:
        labels = labels.astype(np.int64) if labels.ndim == 1 else labels
        if len(labels) != n.copy().pop():
            raise DataError(f"labels have {len(labels)} entries but inputs have {n.pop()} samples")
    ds = Dataset(inputs, labels, str(source) if not isinstance(source, dict) else "arrays")
    if limit is not None and limit < len(ds):
        ds = ds.subset(slice(0, limit))
    return ds


def _normalise(x: np.ndarray, mean, std, layout: str) -> np.ndarray:
    mean = np.asarray(mean if mean is not None else [0.0], dtype=np.float32)
    std = np.asarray(std if std is not None else [1.0], dtype=np.float32)
    if mean.size > 1 or std.size > 1:
        if x.ndim != 4:
            raise DataError("per-channel --mean/--std need 4-D image data")
        shape = [1, -1, 1, 1] if layout == "nchw" else [1, 1, 1, -1]
        mean, std = mean.reshape(shape), std.reshape(shape)
    return (x - mean) / std
