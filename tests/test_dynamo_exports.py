"""Models exported by torch's default (dynamo, torch.export-based) ONNX exporter import exactly and
train. That exporter needs onnxscript, which onnxadmm does not depend on: without it these tests
skip."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnxadmm.importer.graph import OnnxGraphModule

pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Attention(nn.Module):
    """Packed QKV projection, causal scaled_dot_product_attention (Attention-23 at opset 23)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 10)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)).mean(1)


class _MobileBlock(nn.Module):
    """Stem conv + BN + hardswish, depthwise and pointwise convs, squeeze-and-excitation, head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.dw, self.pw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 24, 1)
        self.se1, self.se2, self.head = nn.Linear(24, 6), nn.Linear(6, 24), nn.Linear(24, 10)

    def forward(self, x):
        h = F.hardswish(self.bn(self.stem(x)))
        h = F.relu6(self.pw(self.dw(h)))
        gate = torch.sigmoid(self.se2(F.silu(self.se1(h.mean((2, 3))))))[:, :, None, None]
        return self.head((h * gate).mean((2, 3)))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
        self.enc, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x)[:, 0])


CASES = {
    "attention": (_Attention, (2, 5, 16)),
    "mobile_block": (_MobileBlock, (2, 3, 16, 16)),
    "transformer_encoder": (_Encoder, (2, 7, 16)),
}


def _export(net, x, path, opset=18, **kw):
    logging.disable(logging.WARNING)  # the exporter's notes about torchvision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(path), dynamo=True, opset_version=opset, input_names=["x"], **kw)
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("case", list(CASES))
def test_dynamo_export_imports_exactly(case, opset, tmp_path):
    make, shape = CASES[case]
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(*shape)
    path = tmp_path / "m.onnx"
    _export(net, x, path, opset)
    model = onnx.load(str(path))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    m = OnnxGraphModule(model)
    got = m(x)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.detach().numpy(), net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    got.sum().backward()
    assert m.compressible_weights()
    for name, p in m.named_onnx_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


class _PooledCNN(nn.Module):
    def __init__(self, pool: str):
        super().__init__()
        self.pool = pool
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        if self.pool == "mean":
            h = h.mean((2, 3))  # ReduceMean, keepdims 0
        elif self.pool == "adaptive":
            h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # ReduceMean keepdims 1, Reshape
        else:
            h = h.amax((2, 3))  # ReduceMax
        return self.fc(h)


@pytest.mark.parametrize("pool", ["mean", "adaptive", "amax"])
def test_filter_pruning_shrinks_the_last_conv_before_global_pooling(pool, tmp_path):
    """Dynamo writes global pooling as a Reduce over the spatial axes: the last convolution before it
    loses its pruned filters too, and the written file passes onnx's full check."""
    from onnxadmm.compress.pipeline import compress

    torch.manual_seed(0)
    net = _PooledCNN(pool).eval()
    x = torch.randn(64, 1, 8, 8)
    path = tmp_path / "m.onnx"
    _export(net, x[:2], path, dynamic_shapes=({0: "batch"},))
    names = {n.input[1] for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}
    last = next(n for n in names if "c2" in n)
    out = tmp_path / "o.onnx"
    fast = dict(admm_iterations=1, retrain_epochs=1, max_batches_per_epoch=2, batch_size=32, min_batches=1)
    rep = compress(path, out, {"x": x.numpy()}, rate="2x", structure="filter", quiet=True, **fast)
    assert rep["shrunk"]["checked"], rep["shrunk"]
    assert last not in rep["shrunk"]["kept_whole"], rep["shrunk"]["kept_whole"]
    assert rep["shrunk"]["channels_removed"].get(last, 0) > 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert w[last].shape[0] < 16
