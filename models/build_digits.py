"""Build models/digits_cnn.onnx: a small CNN trained on scikit-learn's handwritten digits.

It is the embedded default for the README demo (no download needed: the digits ship inside
scikit-learn). The network is trained in torch and written as a plain ONNX graph with onnx.helper
(opset 13, dynamic batch), so it does not depend on any torch ONNX exporter.

    python models/build_digits.py            # rewrites models/digits_cnn.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

HERE = Path(__file__).resolve().parent


def load_digits_split(seed: int = 0):
    """Digits as float32 [N,1,8,8] in 0..1 (pixel/16), labels int64; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(seed: int = 0, epochs: int = 40) -> tuple[DigitsCNN, float]:
    torch.manual_seed(seed)
    (xt, yt), (xv, yv) = load_digits_split(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt_t, yt_t = torch.from_numpy(xt), torch.from_numpy(yt)
    for _ in range(epochs):
        perm = torch.randperm(len(xt_t))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt_t[b]), yt_t[b]).backward()
            opt.step()
    with torch.no_grad():
        acc = (net(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean()
    return net, float(acc)


def to_onnx(net: DigitsCNN) -> onnx.ModelProto:
    w = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 512], dtype=np.int64), "flat_shape"))
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p2", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxadmm build_digits")
    m.ir_version = 8
    m.doc_string = "Small CNN for scikit-learn digits (8x8, pixel/16). Input [N,1,8,8] float in 0..1."
    onnx.checker.check_model(m)
    return m


def main(out: Path = HERE / "digits_cnn.onnx") -> None:
    net, acc = train()
    onnx.save_model(to_onnx(net), out)
    print(f"wrote {out} (held-out accuracy {acc:.4f}, {sum(p.numel() for p in net.parameters())} params)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "digits_cnn.onnx")
