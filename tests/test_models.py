"""End to end on the real models in shared/models: verify passes; torch agrees with onnxruntime on MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import manifest_entries

from onnxadmm.errors import NothingToCompressError
from onnxadmm.importer.graph import OnnxGraphModule
from onnxadmm.validate import ortrun
from onnxadmm.validate.verify import verify_model

MODELS = [e for e in manifest_entries()]
if not MODELS:
    MODELS = [
        pytest.param(None, marks=pytest.mark.skip(reason="shared/models not found beside the checkout"))
    ]


@pytest.mark.parametrize("entry", MODELS, ids=lambda e: e["file"] if e else "none")
def test_verify_every_shared_model(entry):
    if entry["file"].endswith("logreg_iris.onnx"):
        with pytest.raises(NothingToCompressError, match="nothing to compress"):
            verify_model(entry["path"])
        return
    r = verify_model(entry["path"])
    failed = [f"{c.name}: {c.detail}" for c in r.checks if not c.ok]
    assert r.ok, failed
    names = [c.name for c in r.checks]
    assert "backward reaches weights" in names and "writer round trip" in names


# Each MNIST model's own preprocessing (shared/models/README.md): (layout, transform)
MNIST = {
    "Frenz86+mnistonnx/mnist.onnx": ("nhwc", lambda x: x),
    "wuhanstudio+onnx-parser/mnist-sm.onnx": ("nhwc", lambda x: x / 255),
    "wuhanstudio+onnx-parser/mnist-lg.onnx": ("nhwc", lambda x: x / 255),
    "akinobu123+tf2onnx/mnist.onnx": ("flat", lambda x: x / 255),
    "CODEMAN251+mnist-cnn-onnx/mnist_cnn.onnx": ("nchw", lambda x: (x / 255 - 0.5) / 0.5),
    "ram6ces+mnist/mnist.onnx": ("nchw", lambda x: (x / 255 - 0.1307) / 0.3081),
    "yliess86+MNISTWeb/mnist.onnx": ("flat", lambda x: x / 255),
    "michbogos+mnist-experiments/mnist.onnx": ("hw", lambda x: (x / 255 - 0.5) / 0.5),
    "aclex+k210_mnist_assets/mnist_cnn.onnx": ("nchw", lambda x: (x / 255 - 0.1307) / 0.3081),
}


def _mnist_inputs(x: np.ndarray, layout: str) -> np.ndarray:
    x = x.astype(np.float32)
    return {"nhwc": x[..., None], "nchw": x[:, None], "flat": x.reshape(len(x), -1), "hw": x}[layout]


@pytest.mark.parametrize("name", sorted(MNIST))
def test_mnist_predictions_match_onnxruntime(name, models_dir, mnist):
    path = models_dir / name
    layout, f = MNIST[name]
    with np.load(mnist) as z:
        x = f(_mnist_inputs(z["x_test"], layout)).astype(np.float32)
        y = z["y_test"]
    from onnxadmm.compress.objective import training_heads
    from onnxadmm.modelio import load_model

    proto = load_model(path)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[heads[0].name])
    sess = ortrun.session(proto)
    specs = ortrun.input_specs(sess)
    b0 = ortrun.fixed_batch_of(specs)
    xname = module.input_names[0]
    # onnxruntime predictions: from the model's own (Softmax) output; for the accuracy-only model,
    # from a logits output added to the graph.
    ort_logits = _ort_logits(proto, heads[0].name, xname, x, b0)
    with torch.no_grad():
        t = torch.cat([module(torch.from_numpy(x[i : i + 1000])) for i in range(0, len(x), 1000)])
    agree = float((t.argmax(1).numpy() == ort_logits.argmax(1)).mean())
    acc = float((t.argmax(1).numpy() == y).mean())
    assert agree >= 0.999, (agree, acc)
    assert acc > 0.8  # the preprocessing is right: these models reach 83-99% on MNIST


def _ort_logits(proto, name, xname, x, b0):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    if name not in [o.name for o in m.graph.output]:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ortrun.session(m)
    feeds_extra = {
        i.name: np.zeros([len(x)] + [d if isinstance(d, int) else 1 for d in i.shape[1:]], np.float32)
        for i in sess.get_inputs()
        if i.name != xname
    }
    step = b0 or 1000
    outs = []
    for i in range(0, len(x), step):
        feed = {xname: x[i : i + step], **{k: v[i : i + step] for k, v in feeds_extra.items()}}
        outs.append(sess.run([name], feed)[0])
    return np.concatenate(outs).reshape(len(x), -1)
