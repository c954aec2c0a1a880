"""Structured pruning end to end on the digits CNN: whole filters, channels or filter shapes pruned
with ADMM, the removed channels cut out of the written ONNX layers, the result run in onnxruntime.
Training is tiny (plumbing, not accuracy), as in test_compress."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from onnxadmm_cli.main import cli
from test_compress import FAST, FAST_TOML, MODEL, onnx_weights

from onnxadmm.compress.pipeline import compress
from onnxadmm.data import input_specs_of, load_data
from onnxadmm.errors import ConfigError
from onnxadmm.modelio import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models train on one thread


@pytest.fixture(scope="module")
def digits():
    ds = load_data("digits", input_specs_of(load_model(MODEL)))
    return ds.inputs["input"], ds.labels


def _logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def filter_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "filter.onnx"
    logs: list[str] = []
    rep = compress(MODEL, out, "digits", rate="4x", structure="filter", log=logs.append, **FAST)
    return {"rep": rep, "out": out, "logs": logs}


def test_filter_pruning_writes_smaller_layers(filter_run):
    rep, out = filter_run["rep"], filter_run["out"]
    w = onnx_weights(out)
    assert rep["structure"] == "filter" and rep["shrunk"]["checked"]
    assert rep["shrunk"]["channels_removed"]
    by = {x["name"]: x for x in rep["layers"]}
    # the classifier keeps its 10 classes (pruned weight by weight), and says so
    assert list(w["fc2.weight"].shape)[0] == 10
    assert any("weight by weight instead: fc2.weight" in s for s in filter_run["logs"])
    smaller = [n for n, x in by.items() if "shape_after" in x]
    assert smaller, "no layer got smaller"
    for n, x in by.items():
        assert list(w[n].shape) == x.get("shape_after", x["shape"])
        assert int(np.count_nonzero(w[n])) == x["nonzero"]
        assert x["params"] == int(np.prod(x["shape"]))  # rates stay relative to the original layer
    # a layer that lost filters has no all-zero filter left (they were removed, not kept as zeros)
    conv2 = w["conv2.weight"]
    assert conv2.shape[0] < 32 and bool(np.abs(conv2).reshape(conv2.shape[0], -1).sum(axis=1).all())
    total = sum(x["params"] for x in rep["layers"])
    assert rep["pruning_rate"] == pytest.approx(total / sum(x["nonzero"] for x in rep["layers"]))
    # --rate counts the weights written: training stops at a lower rate, as a removed filter takes the
    # next layer's slices with it (the rate is fitted on the initial weights' norms, hence the margin)
    assert rep["target_rate"] == 4.0 and 1.0 < rep["training_rate"] < 4.0
    assert rep["config"]["allocation_power"] == 1.0  # structured default: the same fraction of every layer
    assert rep["pruning_rate"] == pytest.approx(4.0, rel=0.15)


def test_filter_pruned_model_matches_its_training_graph(filter_run, digits):
    """The report's agreement and accuracy come from onnxruntime on the written (smaller) model;
    here the written model is rerun and compared with the report's accuracy."""
    rep, out = filter_run["rep"], filter_run["out"]
    x, y = digits
    logits = _logits(out, x[:200])
    assert logits.shape == (200, 10) and np.isfinite(logits).all()
    assert rep["shrunk"]["max_abs_diff"] <= 1e-4 * max(1.0, float(np.abs(logits).max()))
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("structure", ["channel", "shape"])
def test_channel_and_shape_pruning(tmp_path, structure):
    out = tmp_path / f"{structure}.onnx"
    rep = compress(MODEL, out, "digits", rate="4x", structure=structure, quiet=True, **FAST)
    w = onnx_weights(out)
    fc1 = next(x for x in rep["layers"] if x["name"] == "fc1.weight")
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer}
    if structure == "channel":
        # fc1 reads conv2's flattened output: its channel groups are whole conv2 channels (blocks of
        # 16 features), so the pruned ones leave fc1 and conv2 together and no zero column is left
        cols = w["fc1.weight"]
        assert cols.shape[1] < 512 and cols.shape[1] % 16 == 0
        assert bool((cols != 0).any(axis=0).all())
        assert w["conv2.weight"].shape[0] == cols.shape[1] // 16
    else:
        # every (input channel, kernel offset) of conv2 is kept or pruned across all 32 filters
        c2 = w["conv2.weight"].reshape(w["conv2.weight"].shape[0], -1)
        assert (((c2 != 0).sum(axis=0) == 0) | ((c2 != 0).sum(axis=0) == c2.shape[0])).all()
    assert fc1["params"] == src["fc1.weight"].size
    assert rep["pruning_rate"] >= 4.0 * 0.98


def test_filter_pruning_with_per_channel_quantization(tmp_path, digits):
    """Per-channel codebooks follow the filters that remain after the channels are cut out."""
    out = tmp_path / "fq.onnx"
    rep = compress(
        MODEL, out, "digits", rate="4x", structure="filter", bits=4, granularity="channel", quiet=True, **FAST
    )
    assert rep["shrunk"]["checked"] and rep["shrunk"]["channels_removed"]
    w = onnx_weights(out)
    for n, q in rep["quantization"].items():
        levels = [np.unique(row[row != 0]).size for row in w[n].reshape(w[n].shape[0], -1)]
        if q["per_channel"]:
            assert max(levels) <= 16, n
    x, _ = digits
    assert np.isfinite(_logits(out, x[:50])).all()


def test_unstructured_pruning_and_quantization_inside_a_filter_pruned_model(filter_run, tmp_path, digits):
    """The two-step recipe of the highest-compression benchmark (benchmarks/bench_lenet_hybrid.py):
    a filter-pruned model (physically smaller layers) compressed again, pruned weight by weight and
    quantized to 3 bits. The second run's rate counts the first's (smaller) layers, its positions
    are coded within them, and nothing of the first step's structure comes back."""
    first, out = filter_run["out"], tmp_path / "second.onnx"
    before = onnx_weights(first)
    rep = compress(first, out, "digits", rate="4x", bits=3, quiet=True, **FAST)
    w = onnx_weights(out)
    kept = 0
    for name, x in ((x["name"], x) for x in rep["layers"]):
        assert x["params"] == before[name].size  # measured against the input's (smaller) layer
        assert all(a <= b for a, b in zip(w[name].shape, before[name].shape, strict=True))
        assert np.unique(w[name][w[name] != 0]).size <= 8  # 3 bits, pruned: every code a non-zero level
        kept += int(np.count_nonzero(w[name]))
    assert kept == sum(x["nonzero"] for x in rep["layers"])
    assert rep["pruning_rate"] >= 4.0 * 0.98
    overall = sum(x["params"] for x in filter_run["rep"]["layers"]) / kept
    assert overall >= 0.98 * 4.0 * filter_run["rep"]["pruning_rate"]
    x, _ = digits
    assert np.isfinite(_logits(out, x[:50])).all()
    assert rep["agreement"] is not None and rep["storage"]["total"]["file_weight_bytes"] > 0


def test_second_run_distils_from_the_given_teacher(filter_run, tmp_path):
    """--teacher: the second run of the recipe learns from the dense original, not from its input.
    The teacher's outputs are what the distillation term is computed against: with the dense model
    as teacher and no labels, the loss of the very first batch differs from the run that distils
    from the filter-pruned input."""
    from conftest import binary_digits_model

    first = filter_run["out"]
    x = load_data("digits", input_specs_of(load_model(MODEL))).inputs["input"][:256]
    data = {"input": x}
    one = {**FAST, "admm_iterations": 1, "max_batches_per_epoch": 1}
    runs = {}
    for name, teacher in (("self", None), ("dense", MODEL)):
        logs: list[str] = []
        rep = compress(first, tmp_path / f"{name}.onnx", data, rate="2x", teacher=teacher, log=logs.append, **one)
        runs[name] = (rep, logs)
    assert runs["dense"][0]["teacher"] == str(MODEL) and runs["self"][0]["teacher"] is None
    assert any(f"distilling from {MODEL}" in s for s in runs["dense"][1])
    assert runs["dense"][0]["history"][0]["loss"] != pytest.approx(runs["self"][0]["history"][0]["loss"])

    with pytest.raises(ConfigError, match="not found"):
        compress(first, tmp_path / "x.onnx", data, rate="2x", teacher=tmp_path / "none.onnx", quiet=True, **one)
    other = binary_digits_model(tmp_path / "binary.onnx", sigmoid=False)  # one output column, not ten
    with pytest.raises(ConfigError, match="same outputs"):
        compress(first, tmp_path / "x.onnx", data, rate="2x", teacher=other, quiet=True, **one)
    r = CliRunner().invoke(
        cli, ["compress", str(first), str(tmp_path / "c.onnx"), "--data", "digits", "--rate", "2x",
              "--teacher", str(tmp_path / "none.onnx"), "--admm-iterations", "1"],
    )  # fmt: skip
    assert r.exit_code != 0 and "not found" in r.output and "Traceback" not in r.output


def test_cli_structure_option(tmp_path):
    out = tmp_path / "cli.onnx"
    args = ["compress", str(MODEL), str(out), "--data", "digits", "--rate", "4x", "--structure", "filter"]
    args += ["--admm-iterations", "2", "--retrain-epochs", "1", "--max-batches-per-epoch", "2", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["config"]["structure"] == "filter" and rep["shrunk"]["channels_removed"]
    bad = CliRunner().invoke(cli, args[:-1] + ["--structure", "rows"])
    assert bad.exit_code != 0 and "rows" in bad.output


def test_storage_summary_counts_the_original_layer_sizes(filter_run):
    """The storage summary of a physically smaller model measures it against the original layers."""
    from onnxadmm.validate.storage_report import storage_report

    rep, out = filter_run["rep"], filter_run["out"]
    st = rep["storage"]
    by = {x["name"]: x for x in st["layers"]}
    for x in rep["layers"]:
        assert by[x["name"]]["original_params"] == x["params"]
        assert by[x["name"]]["params"] == int(np.prod(x.get("shape_after", x["shape"])))
        assert by[x["name"]]["fp32_bytes"] == 4 * x["params"]
    assert st["total"]["pruning_rate"] == pytest.approx(rep["pruning_rate"])
    # the same from the CLI's --reference (the original file's tensor sizes)
    again = storage_report(out, reference=MODEL)
    assert again["total"]["original_params"] == sum(x["params"] for x in rep["layers"])
    assert again["total"]["ratio_file"] == pytest.approx(st["total"]["ratio_file"])
    alone = storage_report(out)  # without a reference the file's own shapes are all it knows
    assert alone["total"]["original_params"] == alone["total"]["params"] < again["total"]["original_params"]


def test_fixed_batch_export_is_checked_at_its_own_batch(tmp_path):
    """A model exported with a fixed batch of 1 is checked in onnxruntime at batch 1 after shrinking."""
    m = onnx.load(str(MODEL))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    src = tmp_path / "fixed.onnx"
    onnx.save(m, str(src))
    logs: list[str] = []
    rep = compress(src, tmp_path / "out.onnx", "digits", rate="4x", structure="filter", log=logs.append, **FAST)
    assert rep["shrunk"]["checked"] and rep["shrunk"]["channels_removed"], logs


def test_filter_pruning_at_a_high_rate_prunes_the_head_weight_by_weight(tmp_path):
    """At 20x the classifier head is pruned too (weight by weight), alongside the filter-pruned layers."""
    rep = compress(MODEL, tmp_path / "f20.onnx", "digits", rate="20x", structure="filter", quiet=True, **FAST)
    by = {x["name"]: x for x in rep["layers"]}
    assert by["fc2.weight"]["nonzero"] < 640 and by["fc2.weight"].get("shape_after", [10])[0] == 10
    assert rep["pruning_rate"] >= 20 * 0.98 and rep["shrunk"]["checked"]


@pytest.mark.parametrize(
    "name,structure",
    [
        ("CODEMAN251+mnist-cnn-onnx/mnist_cnn.onnx", "channel"),  # PyTorch: Constant-node Reshape target
        ("akinobu123+tf2onnx/mnist.onnx", "filter"),  # TensorFlow: MatMul + Add, an accuracy output
        ("aclex+k210_mnist_assets/mnist_cnn.onnx", "filter"),  # fixed batch of 1, Pad, AveragePool
        # Keras: NHWC input, nodes out of order, Transpose to channels-last before the flatten (each
        # conv channel's features are interleaved in the dense layer's input)
        ("wuhanstudio+onnx-parser/mnist-lg.onnx", "channel"),
    ],
)
def test_structured_pruning_of_real_mnist_models(models_dir, mnist, tmp_path, name, structure):
    """Real exports from the shared models, on real MNIST digits: channels come out of the ONNX
    layers and the smaller model passes the onnxruntime check (tiny training: plumbing only)."""
    path = models_dir / name
    with np.load(mnist) as z:
        x, y = z["x_test"][:600], z["y_test"][:600]
    specs = input_specs_of(load_model(path))
    main = next(s for s in specs if 28 in s.shape or s.shape[-1] == 784)  # the image (akinobu also takes labels)
    shape = [d if isinstance(d, int) and d > 0 else None for d in main.shape]
    imgs = x.astype(np.float32) / 255.0
    imgs = imgs.reshape(len(imgs), *[d for d in shape[1:]]) if all(shape[1:]) else imgs
    data = {main.name: imgs, "y": y.astype(np.int64)}
    out = tmp_path / "out.onnx"
    logs: list[str] = []
    rep = compress(path, out, data, rate="4x", structure=structure, log=logs.append, **FAST)
    assert rep["shrunk"]["checked"], logs
    assert sum(rep["shrunk"]["channels_removed"].values()) > 0
    assert any("shape_after" in x for x in rep["layers"])
    assert rep["accuracy"]["compressed"] is not None
    if name.startswith("wuhanstudio"):
        by = {x["name"]: x for x in rep["layers"]}
        assert by["W2"]["shape_after"][0] < 4 and by["W1"]["shape_after"][0] < 196, by


def test_filter_pruning_of_a_paddle_text_detector(models_dir, tmp_path):
    """PP-OCRv3's text detector (PaddlePaddle: conv biases as Reshape + Add, squeeze-and-excitation
    products, a feature pyramid of Resize + Add, ConvTranspose head): filter pruning cuts channels out
    of almost every layer, and the smaller model passes the onnxruntime check. Random 64x64 images,
    distillation only, tiny training: plumbing, not accuracy."""
    path = models_dir / "utools-blowsnow+ocr-web/ch_PP-OCRv3_det_infer.onnx"
    name = input_specs_of(load_model(path))[0].name
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    out = tmp_path / "det.onnx"
    logs: list[str] = []
    cfg = dict(FAST, batch_size=4, max_batches_per_epoch=1, admm_iterations=1)
    rep = compress(path, out, {name: x}, val_data={name: x[:4]}, rate="2x", structure="filter", log=logs.append, **cfg)
    assert rep["shrunk"]["checked"], logs
    assert len(rep["shrunk"]["channels_removed"]) >= 50  # of 74 layers; 42 before SE/Resize/bias support
    assert not rep["shrunk"]["kept_whole"], rep["shrunk"]["kept_whole"]
    kinds = {n.input[1]: n.op_type for n in load_model(path).graph.node if n.op_type in ("Conv", "ConvTranspose")}
    assert "ConvTranspose" in {kinds.get(w) for w in rep["shrunk"]["channels_removed"]}


@pytest.fixture(scope="module")
def dead_channel_runs(tmp_path_factory):
    """Unstructured pruning with conv2 pruned 300x: most of its filters lose every weight, and fc1
    then has inputs no weight reads. The same run with and without --shrink."""
    d = tmp_path_factory.mktemp("dead")
    from onnxadmm.compress import pipeline

    runs = {}
    for shrink in (True, False):
        out = d / f"shrink_{shrink}.onnx"
        logs: list[str] = []
        with pytest.MonkeyPatch.context() as mp:
            # both runs keep the same weights in training (the shrinking run would keep more, so that
            # the file holds 1/4 of them): the two files must then compute the same function
            mp.setattr(pipeline, "_written_rate", lambda cfg, *a, **k: cfg.rate)
            rep = compress(
                MODEL, out, "digits", rate="4x", layer_rates={"conv2.weight": "300x"}, shrink=shrink,
                log=logs.append, **FAST,
            )  # fmt: skip
        runs[shrink] = {"rep": rep, "out": out, "logs": logs}
    return runs


def test_unstructured_pruning_removes_dead_channels(dead_channel_runs, digits):
    on, off = dead_channel_runs[True], dead_channel_runs[False]
    rep = on["rep"]
    assert rep["structure"] == "none" and rep["shrunk"]["checked"]
    assert rep["shrunk"]["channels_removed"].get("conv2.weight", 0) > 0
    w = onnx_weights(on["out"])
    by = {x["name"]: x for x in rep["layers"]}
    assert list(w["conv2.weight"].shape) == by["conv2.weight"]["shape_after"]
    assert w["conv2.weight"].shape[0] < 32
    # no all-zero filter is left in conv2: the dead ones were cut out, not stored as zeros
    assert np.abs(w["conv2.weight"]).reshape(w["conv2.weight"].shape[0], -1).sum(1).all()
    assert any("pruning: " in s and "channels removed physically" in s for s in on["logs"])
    # --no-shrink: every layer keeps its shape, and the two files compute the same function
    assert off["rep"]["shrunk"] is None
    assert all("shape_after" not in x for x in off["rep"]["layers"])
    assert list(onnx_weights(off["out"])["conv2.weight"].shape) == [32, 16, 3, 3]
    x = digits[0][:200]
    a, b = _logits(on["out"], x), _logits(off["out"], x)
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())))
    assert on["rep"]["file_bytes"]["compressed"] < off["rep"]["file_bytes"]["compressed"]


def test_cli_no_shrink_option(tmp_path):
    out = tmp_path / "o.onnx"
    cfg = tmp_path / "c.toml"
    cfg.write_text(FAST_TOML + '[layers]\n"conv2.weight" = {rate = "300x"}\n')
    res = CliRunner().invoke(
        cli, ["compress", str(MODEL), str(out), "--rate", "4x", "--data", "digits", "--config", str(cfg),
              "--no-shrink", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["config"]["shrink"] is False and rep["shrunk"] is None
    assert list(onnx_weights(out)["conv2.weight"].shape) == [32, 16, 3, 3]


def test_no_shrink_structured_rate_counts_training_weights(tmp_path):
    """Without shrinking, nothing is cut out: --rate is the training rate, as for unstructured pruning."""
    rep = compress(MODEL, tmp_path / "f.onnx", "digits", rate="4x", structure="filter", shrink=False, quiet=True, **FAST)
    assert rep["training_rate"] == rep["target_rate"] == 4.0 and rep["shrunk"] is None
    assert rep["pruning_rate"] == pytest.approx(4.0, rel=0.05)
    assert all("shape_after" not in x for x in rep["layers"])


def test_allocation_power_default_depends_on_the_structure():
    from onnxadmm.compress.config import CompressConfig

    assert CompressConfig().power() == 0.3
    assert CompressConfig(structure="channel").power() == 1.0
    assert CompressConfig(structure="filter", allocation_power=0.5).validate().power() == 0.5
    # resolved only where it is used: a structure set after a config file still gets its default
    assert CompressConfig().validate().updated(structure="filter").validate().power() == 1.0


def _residual_digits(path, depthwise: bool = False):
    """A small ResNet for the digits data (random weights): stem conv-BN-ReLU (16 filters), a basic
    block conv-BN-ReLU-conv-BN plus the identity, ReLU, global pool, dense head. ``depthwise``: a
    MobileNet block instead (the block's first conv depthwise, its second 1x1, no identity)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    inits = {"w0": he(16, 1, 3, 3), "w1": he(16, 16, 3, 3), "w2": he(16, 16, 3, 3), "wf": he(10, 16), "bf": np.zeros(10, np.float32)}
    if depthwise:
        inits["w1"], inits["w2"] = he(16, 1, 3, 3), he(16, 16, 1, 1)
    nodes = []
    for i, (src, w) in enumerate([("input", "w0"), ("r0", "w1"), ("r1", "w2")]):
        for k, v in {"s": 1.0, "b": 0.0, "m": 0.0, "v": 1.0}.items():
            inits[f"{k}{i}"] = np.full(16, v, np.float32) + (rng.standard_normal(16) * 0.1).astype(np.float32)
        inits[f"v{i}"] = np.abs(inits[f"v{i}"])
        pads, group = ([0] * 4, 1) if depthwise and i == 2 else ([1] * 4, 16 if depthwise and i == 1 else 1)
        nodes.append(helper.make_node("Conv", [src, w], [f"c{i}"], pads=pads, group=group))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"]))
    nodes += [
        helper.make_node("Add", ["n2", "r0"], ["sum"]) if not depthwise else helper.make_node("Identity", ["n2"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    g = helper.make_graph(
        nodes, "resnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _compress_toy(tmp_path, structure: str, depthwise: bool = False):
    """The toy ResNet (or MobileNet block) of ``_residual_digits`` compressed 3x with ``structure``:
    (report, log lines, written weights); the smaller model passed the onnxruntime check."""
    src = tmp_path / "toy.onnx"
    _residual_digits(src, depthwise=depthwise)
    logs: list[str] = []
    rep = compress(src, tmp_path / "out.onnx", "digits", rate="3x", structure=structure, log=logs.append, **FAST)
    assert rep["shrunk"]["checked"]
    return rep, logs, onnx_weights(tmp_path / "out.onnx")


def test_filter_pruning_of_a_residual_stream_removes_its_channels(tmp_path):
    """The stem and the block's last conv are summed: filter pruning keeps the same filters in both,
    so the stream's channels leave the file (both producers, the block's first conv, BN, the head),
    checked in onnxruntime against the unshrunk model."""
    rep, logs, w = _compress_toy(tmp_path, "filter")
    assert any("1 group(s) of layers tied by residual sums" in s for s in logs), logs
    assert w["w0"].shape[0] == w["w2"].shape[0] == w["w1"].shape[1] == w["wf"].shape[1] < 16
    assert rep["pruning_rate"] == pytest.approx(3.0, rel=0.2)


def test_filter_pruning_removes_depthwise_filters_with_their_input_channels(tmp_path):
    """A depthwise conv's filter c reads its producer's channel c only: filter pruning prunes the
    two together, so channel c leaves the producer, the depthwise conv (and its BN) and the 1x1
    reader."""
    rep, logs, w = _compress_toy(tmp_path, "filter", depthwise=True)
    assert any("1 group(s) of layers" in s for s in logs), logs
    assert w["w0"].shape[0] == w["w1"].shape[0] == w["w2"].shape[1] < 16
    m = onnx.load(str(tmp_path / "out.onnx"))
    dw = next(n for n in m.graph.node if n.op_type == "Conv" and n.input[1] == "w1")
    assert next(a.i for a in dw.attribute if a.name == "group") == w["w1"].shape[0]


def test_channel_pruning_of_a_residual_stream_removes_its_channels(tmp_path):
    """The stream (stem + block output) is read by the block's first conv and, after the pool, by
    the head: channel pruning drops the same input channels in both readers, so the stream's
    channels leave both producers too, checked in onnxruntime."""
    from onnxadmm.export.shrink import coupled_readers

    rep, logs, w = _compress_toy(tmp_path, "channel")
    assert sorted(map(sorted, coupled_readers(load_model(tmp_path / "toy.onnx")))) == [["w1", "wf"]]
    assert any("1 group(s) of layers reading the same channels" in s for s in logs), logs
    assert w["w0"].shape[0] == w["w2"].shape[0] == w["w1"].shape[1] == w["wf"].shape[1] < 16
