"""``onnxadmm report``: per-layer storage of plain, codebook-stored and int8 models; Deep Compression count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnxadmm_cli.main import cli

from onnxadmm.compress.pipeline import compress
from onnxadmm.validate.storage_report import deep_compression, storage_report

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
SIZES = {"conv1.weight": 144, "conv2.weight": 4608, "fc1.weight": 32768, "fc2.weight": 640}
FAST = {"admm_iterations": 1, "retrain_epochs": 1, "min_batches": 1, "max_batches_per_epoch": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("report")
    out = {}
    out["codebook"] = d / "pq.onnx"
    compress(MODEL, out["codebook"], "digits", quiet=True, rate=8, bits=2, fmt="codebook", **FAST)
    out["packed"] = d / "pruned.onnx"
    compress(MODEL, out["packed"], "digits", quiet=True, rate=20, **FAST)
    out["int8"] = d / "i8.onnx"
    compress(MODEL, out["int8"], "digits", quiet=True, rate=30, bits=8, fmt="int8", **FAST)
    return out


def decoded_weights(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    for n in WEIGHTS:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 1, 8, 8), np.float32)
    return dict(zip(WEIGHTS, sess.run(WEIGHTS, {sess.get_inputs()[0].name: x})))


def test_deep_compression_count_by_hand():
    w = np.zeros(40, np.float32)
    w[::5] = [1, -1, 1, -1, 1, -1, 1, -1]  # 8 values, runs of 4 zeros between them; K = 2 -> 1 bit
    dc = deep_compression(w)
    # codebook, r = 3: no filler (4 // 8 = 0): 8 entries x (1 + 3) bits + codebook 2 x 32 = 96 bits;
    # r = 2: a filler per run (4 // 4): 15 x 3 + 64 = 109; dense: 40 x 2 bits (3 levels with 0) + 64 = 144;
    # raw floats: 8 x (32 + 3) = 280 sparse, 1280 dense
    assert dc["encoding"] == "sparse" and dc["gap_bits"] == 3 and dc["fillers"] == 0
    assert dc["value_bits"] == 1 and dc["total_bits"] == 96 and dc["bytes"] == 12
    two = np.zeros(10, np.float32)
    two[2], two[9] = 1.0, -1.0  # so few values that raw floats beat a codebook: 2 x (32 + 3) = 70 < 72
    assert deep_compression(two)["total_bits"] == 70 and deep_compression(two)["value_bits"] == 32
    dense = deep_compression(np.array([0.5, -0.5, 0.5, 0.5] * 4, np.float32))
    assert dense["encoding"] == "dense" and dense["total_bits"] == 16 * 1 + 2 * 32
    raw = deep_compression(np.arange(1, 301, dtype=np.float32))  # 300 distinct values: raw floats
    assert raw["value_bits"] == 32 and raw["total_bits"] == 300 * 32


def test_codebook_model_report(compressed):
    path = compressed["codebook"]
    rep = storage_report(path, reference=MODEL)
    w = decoded_weights(path)
    assert [x["name"] for x in rep["layers"]] == WEIGHTS
    for x in rep["layers"]:
        b = x["bytes"]
        assert x["storage"] == "codebook"
        assert b["file"] == b["values"] + b["positions"] + b["codebook"]
        assert x["nonzero"] == np.count_nonzero(w[x["name"]]) and x["params"] == w[x["name"]].size
        assert x["distinct"] == len(np.unique(w[x["name"]][w[x["name"]] != 0])) <= 4  # 2 bits, pruned: +-q, +-2q
        assert x["ratio_file"] == pytest.approx(4 * x["original_params"] / b["file"])  # before any shrink
    t = rep["total"]
    assert t["file_weight_bytes"] == sum(x["bytes"]["file"] for x in rep["layers"])
    assert t["file_weight_bytes"] < rep["file_bytes"] < MODEL.stat().st_size
    assert t["theoretical_bytes"] == pytest.approx(sum(x["deep_compression"]["bytes"] for x in rep["layers"]))
    assert t["pruning_rate"] >= 8 * 0.99
    assert rep["file_ratio"] == pytest.approx(MODEL.stat().st_size / path.stat().st_size)
    # compress printed and stored the same summary
    saved = json.loads(path.with_name("pq.report.json").read_text())
    assert saved["storage"]["total"]["file_weight_bytes"] == t["file_weight_bytes"]
    assert sorted(saved["format"]["codebook_tensors"]) == sorted(WEIGHTS)


def test_int8_model_report(compressed):
    rep = storage_report(compressed["int8"])
    assert {x["storage"] for x in rep["layers"]} == {"int8"}
    for x in rep["layers"]:
        assert x["bits"] == 8 and x["bytes"]["values"] == x["params"]  # one int8 per weight
        assert x["bytes"]["codebook"] > 0  # scales and zero points
        assert 3.5 < x["ratio_file"] <= 4.0
    # with the reference, each DequantizeLinear output is matched to its original weight (pruned 30x,
    # some layers were written smaller: dead channels cut out)
    ref = storage_report(compressed["int8"], reference=MODEL)
    assert [x["original_params"] for x in ref["layers"]] == [SIZES[n] for n in WEIGHTS]
    # layers are named after their weights, with or without the reference; "tensor": the graph's name
    assert [x["name"] for x in rep["layers"]] == [x["name"] for x in ref["layers"]] == WEIGHTS
    assert all(x["tensor"].endswith("_DequantizeLinear_Output") for x in rep["layers"])
    assert any(x["params"] < x["original_params"] for x in ref["layers"])


def test_plain_model_report():
    rep = storage_report(MODEL)
    for x in rep["layers"]:
        assert x["storage"] == "dense" and x["bits"] == 32
        assert x["bytes"]["file"] == 4 * x["params"] and x["ratio_file"] == 1.0


def test_cli_report_json_and_text(compressed):
    r = CliRunner().invoke(cli, ["report", str(compressed["codebook"]), "--reference", str(MODEL), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    # the reference's layer sizes: the written layers may be smaller (dead channels cut out)
    assert d["total"]["original_params"] == 38160 >= d["total"]["params"] and "file_ratio" in d
    r = CliRunner().invoke(cli, ["report", str(compressed["codebook"])])
    assert r.exit_code == 0 and "Deep Compression" in r.output and "fc1.weight" in r.output


def test_cli_report_plot(compressed, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    r = CliRunner().invoke(cli, ["report", str(compressed["codebook"]), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_report_errors(tmp_path):
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.onnx")])
    assert r.exit_code != 0 and "missing.onnx" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = CliRunner().invoke(cli, ["report", str(bad)])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_packed_pruned_model_report(compressed):
    """Pruned float layers in the packed form (raw values + positions): byte counts add up, the
    values cost 4 bytes per stored entry, and the file's weight bytes are what the report says."""
    from onnxadmm.export.storage import analyze

    path = compressed["packed"]
    rep = storage_report(path, reference=MODEL)
    w = decoded_weights(path)
    packed = [x for x in rep["layers"] if x["storage"] == "packed"]
    assert {x["name"] for x in packed} >= {"fc1.weight"}
    entries = analyze(onnx.load(str(path)))
    for x in packed:
        e = entries[x["name"]]
        assert x["bits"] == 32 and x["bytes"]["values"] == 4 * (e["stored"] + e["fillers"])
        assert x["nonzero"] == np.count_nonzero(w[x["name"]]) == e["nonzero"]
        assert x["bytes"]["file"] == x["bytes"]["values"] + x["bytes"]["positions"] + x["bytes"]["codebook"]
    t = rep["total"]
    assert t["file_weight_bytes"] == sum(x["bytes"]["file"] for x in rep["layers"]) < rep["file_bytes"]
    assert rep["file_bytes"] == path.stat().st_size


def test_layout_column(compressed):
    """Each row says how its weight is stored; the text table shows it."""
    from onnxadmm.export.storage import analyze

    for key, first in (("codebook", "codes"), ("packed", "raw")):
        rep = storage_report(compressed[key])
        entries = analyze(onnx.load(str(compressed[key])))
        for x in rep["layers"]:
            e = entries[x["name"]]
            words = x["layout"].split()
            if e["storage"] != "codebook":  # a layer the planner left plain
                assert words == ["fp32"]
                continue
            assert words[0] == first
            assert ("bundle" in words) == ("region" in e)
            region = e.get("region") or ("gaps" if e["sparse"] else "dense")
            assert words[1] == region and (region != "gaps" or words[2] == f"{e['gap_bits']}b")
    assert {x["layout"] for x in storage_report(compressed["int8"])["layers"]} == {"int8 dense"}
    assert {x["layout"] for x in storage_report(MODEL)["layers"]} == {"fp32"}
    r = CliRunner().invoke(cli, ["report", str(compressed["codebook"])])
    assert r.exit_code == 0 and "layout" in r.output.splitlines()[0]
    for x in storage_report(compressed["codebook"])["layers"]:
        assert x["layout"] in r.output


def test_recurrent_weights_are_reported(tmp_path):
    """An LSTM's W and R are compressible weights (pruned and quantized weight by weight): the report
    lists them, with their non-zeros, beside the head's MatMul weight."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(1, 16, 3)).astype(np.float32)
    w[:, ::2] = 0
    r = rng.normal(size=(1, 16, 4)).astype(np.float32)
    head = rng.normal(size=(4, 2)).astype(np.float32)
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=4),
        helper.make_node("Squeeze", ["h", "ax"], ["hs"]),
        helper.make_node("MatMul", ["hs", "head"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in {"W": w, "R": r, "head": head}.items()]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax"))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    path = tmp_path / "lstm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), path)
    rep = storage_report(path)
    layers = {x["name"]: x for x in rep["layers"]}
    assert set(layers) == {"W", "R", "head"}
    assert layers["W"]["params"] == 48 and layers["W"]["nonzero"] == 24 and layers["R"]["nonzero"] == 64
