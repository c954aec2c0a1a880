"""evaluate: accuracy, agreement, output diffs, fixed-batch chunking, latency, file sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import binary_digits_model
from onnx import helper, numpy_helper

from onnxadmm.data import Dataset, input_specs_of, load_data
from onnxadmm.errors import ConfigError, DataError, OnnxAdmmError
from onnxadmm.modelio import load_model, save_model
from onnxadmm.validate import evaluate as ev
from onnxadmm.validate.evaluate import evaluate_model, format_evaluation

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
FAST = {"warmup": 1, "runs": 5}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_data("digits", input_specs_of(load_model(MODEL)))


@pytest.fixture(scope="module")
def held_out(digits) -> Dataset:
    return digits.split(0.2, seed=0)[1]


def _with_initializer(model: onnx.ModelProto, name: str, fn) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)), name))
            return m
    raise AssertionError(f"no initializer {name}")


def _fixed_batch_copy(path: Path, b0: int) -> Path:
    m = _with_initializer(onnx.load(MODEL), "flat_shape", lambda a: np.array([b0, 512], dtype=np.int64))
    for vi in list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = b0
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _direct_accuracy(ds: Dataset) -> float:
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, dict(ds.inputs))
    return float(np.mean(np.argmax(logits, axis=1) == ds.labels))


def test_accuracy_matches_direct_onnxruntime(held_out):
    d = evaluate_model(MODEL, held_out, **FAST)
    assert d["samples"] == len(held_out)
    assert d["accuracy"] == pytest.approx(_direct_accuracy(held_out))
    assert d["accuracy"] > 0.95
    assert d["reference"] is None and d["agreement"] is None and d["max_abs_diff"] is None
    assert d["file_bytes"] == MODEL.stat().st_size
    assert json.loads(json.dumps(d)) == d


def test_one_hot_labels_give_same_accuracy(held_out):
    one_hot = np.eye(10, dtype=np.float32)[held_out.labels]
    d1 = evaluate_model(MODEL, held_out, providers=())
    d2 = evaluate_model(MODEL, Dataset(held_out.inputs, one_hot), providers=())
    assert d1["accuracy"] == d2["accuracy"]
    assert d1["latency"] == {}


def test_no_labels_no_accuracy(held_out):
    d = evaluate_model(MODEL, Dataset(held_out.inputs), providers=())
    assert d["accuracy"] is None
    assert any("no labels" in n for n in d["notes"])


def test_self_agreement_is_exact(held_out):
    d = evaluate_model(MODEL, held_out, reference=MODEL, **FAST)
    assert d["agreement"] == 1.0
    assert d["max_abs_diff"] == 0.0 and d["max_rel_diff"] == 0.0
    assert d["reference"]["accuracy"] == d["accuracy"]
    assert d["reference"]["file_bytes"] == d["file_bytes"]
    assert d["reference"]["max_abs"] > 0
    text = format_evaluation(d)
    assert "agreement" in text and "accuracy" in text


def test_perturbed_copy_differs(tmp_path, held_out):
    m = _with_initializer(onnx.load(MODEL), "conv2.weight", lambda a: a * np.float32(0.5))
    path = tmp_path / "perturbed.onnx"
    onnx.save(m, str(path))
    d = evaluate_model(path, held_out, reference=MODEL, providers=())
    assert d["agreement"] < 1.0 or d["max_abs_diff"] > 0
    assert d["max_abs_diff"] > 0
    assert 0 < d["max_rel_diff"] == pytest.approx(d["max_abs_diff"] / d["reference"]["max_abs"])
    assert 0.0 <= d["agreement"] <= 1.0


def test_reference_without_dataset_uses_random_inputs():
    d = evaluate_model(MODEL, None, reference=MODEL, batch_sizes=(4,), **FAST)
    assert d["agreement"] == 1.0 and d["max_abs_diff"] == 0.0
    assert d["accuracy"] is None and d["samples"] == 0
    assert any("random inputs" in n for n in d["notes"])
    assert list(d["latency"]["cpu"]) == ["4"]


def test_latency_numbers(held_out):
    d = evaluate_model(MODEL, held_out, batch_sizes=(1, 8, 2000), **FAST)  # 2000 > samples: repeated
    cpu = d["latency"]["cpu"]
    assert list(cpu) == ["1", "8", "2000"]
    for stats in cpu.values():
        assert stats["p50_ms"] > 0 and stats["samples_per_s"] > 0
        assert stats["p90_ms"] >= stats["p50_ms"]
    assert "latency" in format_evaluation(d)


def test_latency_without_dataset():
    d = evaluate_model(MODEL, None, batch_sizes=(3,), **FAST)
    assert d["latency"]["cpu"]["3"]["p50_ms"] > 0
    assert d["accuracy"] is None


def test_cuda_reported_skipped_without_gpu(held_out):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    d = evaluate_model(MODEL, held_out, providers=("cpu", "cuda"), batch_sizes=(1,), **FAST)
    assert "not available" in d["latency"]["cuda"]["skipped"]
    assert "1" in d["latency"]["cpu"]
    assert "cuda" in format_evaluation(d) and "skipped" in format_evaluation(d)


def test_cuda_silent_cpu_fallback_is_skipped(monkeypatch, held_out):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    # pretend the build lists CUDA: onnxruntime then silently gives a CPU-only session
    monkeypatch.setattr(
        ev.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    d = evaluate_model(MODEL, held_out, providers=("cuda",), batch_sizes=(1,), **FAST)
    assert "fell back to CPU" in d["latency"]["cuda"]["skipped"]


@pytest.mark.gpu
def test_cuda_latency(held_out):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider not available in this onnxruntime")
    probe = ort.InferenceSession(str(MODEL), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in probe.get_providers():
        pytest.skip("CUDAExecutionProvider falls back to CPU here (no usable GPU)")
    d = evaluate_model(MODEL, held_out, providers=("cuda",), batch_sizes=(1, 32), **FAST)
    cuda = d["latency"]["cuda"]
    assert "skipped" not in cuda
    for stats in cuda.values():
        assert stats["p50_ms"] > 0 and stats["p90_ms"] >= stats["p50_ms"]


def test_unknown_provider_is_one_line_error(held_out):
    with pytest.raises(OnnxAdmmError) as exc:
        evaluate_model(MODEL, held_out, providers=("tpu",))
    assert "tpu" in str(exc.value) and "\n" not in str(exc.value)


def test_full_provider_names_accepted():
    d = evaluate_model(MODEL, None, providers=("CPUExecutionProvider", "cpu"), batch_sizes=(1,), **FAST)
    assert list(d["latency"]) == ["cpu"]


def test_dataset_name_mismatch_is_data_error(held_out):
    bad = Dataset({"pixels": held_out.inputs["input"]}, held_out.labels)
    with pytest.raises(DataError) as exc:
        evaluate_model(MODEL, bad)
    msg = str(exc.value)
    assert "'input'" in msg and "'pixels'" in msg and "\n" not in msg


def test_dataset_shape_mismatch_is_data_error(held_out):
    bad = Dataset({"input": held_out.inputs["input"].reshape(len(held_out), 64)}, held_out.labels)
    with pytest.raises(DataError):
        evaluate_model(MODEL, bad)


def test_bad_options():
    with pytest.raises(ConfigError):
        evaluate_model(MODEL, None, runs=0)
    with pytest.raises(ConfigError):
        evaluate_model(MODEL, None, batch_sizes=(0,))
    with pytest.raises(ConfigError):
        evaluate_model(MODEL, None, label_output="nope", reference=MODEL)


@pytest.mark.parametrize("b0", [1, 4])
def test_fixed_batch_model_is_run_chunkwise(tmp_path, held_out, b0):
    path = _fixed_batch_copy(tmp_path / f"fixed{b0}.onnx", b0)
    ds = held_out.subset(slice(0, 37))  # 37 is not a multiple of 4: last chunk is padded
    d = evaluate_model(path, ds, reference=MODEL, batch_sizes=(1, 32), **FAST)
    assert d["batch"] == b0
    assert d["samples"] == 37
    assert d["accuracy"] == pytest.approx(_direct_accuracy(ds))
    assert d["agreement"] == 1.0
    assert d["max_abs_diff"] < 1e-4
    assert list(d["latency"]["cpu"]) == [str(b0)]
    assert any(f"fixed batch size {b0}" in n for n in d["notes"])
    if b0 == 4:
        assert any("padded" in n for n in d["notes"])
    # without a dataset too: random inputs of b0-multiple count, latency at b0
    d2 = evaluate_model(path, None, reference=MODEL, **FAST)
    assert d2["agreement"] == 1.0 and list(d2["latency"]["cpu"]) == [str(b0)]


def test_integer_class_output_used_as_is(tmp_path, held_out):
    m = onnx.load(MODEL)
    m.graph.node.append(helper.make_node("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0))
    m.graph.output.append(helper.make_tensor_value_info("pred", onnx.TensorProto.INT64, ["N"]))
    path = tmp_path / "argmax.onnx"
    onnx.save(m, str(path))
    d = evaluate_model(path, held_out, label_output="pred", providers=())
    assert d["accuracy"] == pytest.approx(_direct_accuracy(held_out))
    d = evaluate_model(path, held_out, reference=path, label_output="pred", providers=())
    assert d["agreement"] == 1.0 and d["max_abs_diff"] == 0.0


def test_spatial_output_is_flattened(tmp_path, held_out):
    m = onnx.load(MODEL)
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, 10, 1, 1], dtype=np.int64), "s4"))
    m.graph.node.append(helper.make_node("Reshape", ["logits", "s4"], ["logits4"]))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("logits4", onnx.TensorProto.FLOAT, ["N", 10, 1, 1]))
    path = tmp_path / "nc11.onnx"
    onnx.save(m, str(path))
    d = evaluate_model(path, held_out, reference=MODEL, providers=())
    assert d["accuracy"] == pytest.approx(_direct_accuracy(held_out))
    assert d["agreement"] == 1.0
    assert any("by position" in n for n in d["notes"])


def test_file_bytes_counts_external_data(tmp_path, held_out):
    path = save_model(onnx.load(MODEL), tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file()
    d = evaluate_model(path, held_out, reference=MODEL, providers=())
    assert d["file_bytes"] == path.stat().st_size + data.stat().st_size
    assert d["file_bytes"] > path.stat().st_size
    assert d["agreement"] == 1.0 and d["max_abs_diff"] == 0.0


@pytest.mark.parametrize("sigmoid", [False, True])
def test_one_column_output_is_a_binary_classifier(tmp_path, held_out, sigmoid):
    """One value per sample: class 1 above 0.5 for a Sigmoid probability, above 0 for a logit."""
    path = binary_digits_model(tmp_path / f"bin{int(sigmoid)}.onnx", sigmoid)
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, dict(held_out.inputs))
    is_zero = np.argmax(logits, axis=1) == 0
    labels = np.isin(held_out.labels, [0, 6]).astype(np.int64)  # the 6s: errors the rule must count
    binary = Dataset(dict(held_out.inputs), labels)
    d = evaluate_model(path, binary, providers=())
    expected = float(np.mean(is_zero == labels.astype(bool)))
    assert d["accuracy"] == pytest.approx(expected)
    assert 0.7 < expected < 0.95 and labels.mean() < 0.5  # neither perfect nor all one class
    cut = "0.5" if sigmoid else "0"
    assert any(f"a binary classifier, class 1 above {cut}" in n for n in d["notes"])
    other = binary_digits_model(tmp_path / "other.onnx", not sigmoid)  # the other form decides the same
    d = evaluate_model(path, binary, reference=other, providers=())
    assert d["agreement"] == 1.0 and d["reference"]["accuracy"] == pytest.approx(expected)


def test_binary_threshold_rule():
    assert ev.binary_threshold(np.array([0.2, 0.9]), "Sigmoid") == 0.5
    assert ev.binary_threshold(np.array([0.2, 0.9]), "Add") == 0.5  # all within [0, 1]: a probability
    assert ev.binary_threshold(np.array([-3.0, 0.9]), "Add") == 0.0  # a logit


def test_one_column_regression_gets_no_classes(tmp_path, held_out):
    """Labels other than 0/1 on a one-column output: a regression target, no accuracy."""
    path = binary_digits_model(tmp_path / "reg.onnx", sigmoid=False)
    targets = Dataset(dict(held_out.inputs), held_out.labels.astype(np.float32) * 0.37)
    d = evaluate_model(path, targets, reference=path, providers=())
    assert d["accuracy"] is None and d["agreement"] is None and d["max_abs_diff"] == 0.0
    assert any("regression output" in n for n in d["notes"])


def test_regression_output_is_scored_by_rmse_mae_and_r2(tmp_path, held_out):
    """A regression output with targets: RMSE, MAE and R^2 against them (the reference's too), and
    every float output's fit to the reference's, all as numpy computes them; printed in the text."""
    path = binary_digits_model(tmp_path / "reg.onnx", sigmoid=False)
    other = _with_initializer(onnx.load(path), "fc2.weight", lambda a: a * 1.1)
    onnx.save(other, str(tmp_path / "other.onnx"))
    targets = held_out.labels.astype(np.float32) * 0.37
    d = evaluate_model(tmp_path / "other.onnx", Dataset(dict(held_out.inputs), targets), reference=path, providers=())
    sess = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])  # noqa: E731
    (y,) = sess(tmp_path / "other.onnx").run(None, dict(held_out.inputs))
    (r,) = sess(path).run(None, dict(held_out.inputs))
    y, r, t = y.astype(np.float64).ravel(), r.astype(np.float64).ravel(), targets.astype(np.float64)
    reg = d["regression"]
    assert reg["rmse"] == pytest.approx(np.sqrt(np.mean((y - t) ** 2)))
    assert reg["mae"] == pytest.approx(np.mean(np.abs(y - t)))
    assert reg["r2"] == pytest.approx(1 - np.sum((y - t) ** 2) / np.sum((t - t.mean()) ** 2))
    assert d["reference"]["regression"]["rmse"] == pytest.approx(np.sqrt(np.mean((r - t) ** 2)))
    (name,) = d["fit_to_reference"]
    fit = d["fit_to_reference"][name]
    assert fit["r2"] == pytest.approx(1 - np.sum((y - r) ** 2) / np.sum((r - r.mean()) ** 2))
    assert 0 < fit["r2"] < 1 and fit["rmse"] > 0
    text = format_evaluation(d)
    assert "regression:   RMSE" in text and f"fit {name!r}: RMSE" in text
    same = evaluate_model(path, Dataset(dict(held_out.inputs), targets), reference=path, providers=())
    assert same["fit_to_reference"][name] == {"rmse": 0.0, "mae": 0.0, "r2": 1.0}
    assert same["accuracy"] is None  # no classes from a regression output


def test_classifier_has_no_regression_scores(held_out):
    d = evaluate_model(MODEL, held_out, reference=MODEL, providers=())
    assert d["regression"] is None and d["accuracy"] > 0.9
    assert d["fit_to_reference"]["logits"]["r2"] == 1.0


@pytest.mark.parametrize("sigmoid", [True, False])
def test_one_column_without_labels(tmp_path, held_out, sigmoid):
    """Without labels a one-column output is a binary classifier only when a Sigmoid makes it (seen
    through a Reshape); a bare one-column output is compared as a regression output."""
    path = binary_digits_model(tmp_path / "b.onnx", sigmoid)
    m = onnx.load(path)
    out = m.graph.output[0].name
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape2"))
    m.graph.node.append(helper.make_node("Reshape", [out, "shape2"], ["reshaped"]))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("reshaped", onnx.TensorProto.FLOAT, ["N", 1]))
    onnx.save(m, str(path))
    d = evaluate_model(path, Dataset(dict(held_out.inputs)), reference=path, providers=())
    assert d["max_abs_diff"] == 0.0
    if sigmoid:
        assert d["agreement"] == 1.0
        assert any("a binary classifier, class 1 above 0.5" in n for n in d["notes"])
    else:
        assert d["agreement"] is None
        assert any("regression output" in n for n in d["notes"])


def test_cli_scores_the_logits_of_a_model_whose_output_needs_labels(tmp_path, digits):
    """A model whose only output is an accuracy computed from a labels input (as some TensorFlow
    exports are) is scored on the logits it computes, from the inputs the data hold."""
    from click.testing import CliRunner
    from onnxadmm_cli.main import cli

    m = onnx.load(MODEL)
    m.graph.input.append(helper.make_tensor_value_info("labels", onnx.TensorProto.INT64, ["N"]))
    m.graph.node.extend(
        [
            helper.make_node("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0),
            helper.make_node("Equal", ["pred", "labels"], ["hit"]),
            helper.make_node("Cast", ["hit"], ["hitf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["hitf"], ["acc"], keepdims=0),
        ]
    )
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("acc", onnx.TensorProto.FLOAT, []))
    path = tmp_path / "acc_model.onnx"
    onnx.save(m, str(path))
    data = tmp_path / "d.npz"
    np.savez(data, input=digits.inputs["input"], y=digits.labels)
    args = ["evaluate", str(path), "--data", str(data), "--batch-sizes", "1", "--runs", "2", "--json"]
    r = CliRunner().invoke(cli, args + ["--reference", str(path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["accuracy"] == pytest.approx(_direct_accuracy(digits))
    assert d["agreement"] == 1.0 and d["model"] == str(path)
    assert d["file_bytes"] == path.stat().st_size == d["reference"]["file_bytes"]
    assert d["reference"]["model"] == str(path)
    assert "scored output(s) logits computed from input" in d["notes"][0]


def test_image_output_has_no_top1(tmp_path):
    """An output with several axes beyond the batch (an image: [N, 3, H, W]) gets no top-1 and no
    agreement; the comparison rests on the output differences. [N, C, 1, 1] is still a classifier."""
    x = np.random.default_rng(0).standard_normal((6, 2, 5, 5)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((3, 2, 1, 1)).astype(np.float32)
    for name, y_shape, extra in [("img", ["N", 3, 5, 5], []), ("cls", ["N", 3, 1, 1], ["GlobalAveragePool"])]:
        nodes = [helper.make_node("Conv", ["x", "w"], ["c" if extra else "y"])]
        if extra:
            nodes.append(helper.make_node(extra[0], ["c"], ["y"]))
        g = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 5, 5])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)], [numpy_helper.from_array(w, "w")],
        )  # fmt: skip
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
        d = evaluate_model(path, Dataset({"x": x}), reference=path, providers=())
        assert d["max_abs_diff"] == 0.0
        if name == "img":
            assert d["agreement"] is None
            assert any("more than one axis beyond the batch" in n for n in d["notes"])
        else:
            assert d["agreement"] == 1.0
