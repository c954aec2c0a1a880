"""Data loading: .npz / folders of .npy / built-in digits, shaping to the model's inputs, one-line
DataErrors, --scale/--mean/--std/--layout conversions and Dataset.split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxadmm_cli.main import cli

from onnxadmm.data import Dataset, InputSpec, input_specs_of, load_data
from onnxadmm.errors import DataError
from onnxadmm.modelio import load_model

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
F32 = np.dtype("float32")


@pytest.fixture(scope="module")
def specs() -> list[InputSpec]:
    return input_specs_of(load_model(MODEL))


@pytest.fixture(scope="module")
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 16.0)[:, None], d.target.astype(np.int64)


def one_line_data_error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert msg.strip() and "\n" not in msg, msg
    return msg


def rand(*shape, seed=0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(dtype)


# ---- specs and sources -----------------------------------------------------------------------------


def test_input_specs_of_digits(specs):
    assert len(specs) == 1
    s = specs[0]
    assert s.name == "input" and s.shape == ["N", 1, 8, 8] and s.dtype == F32


def test_builtin_digits(specs, digits_arrays):
    x, y = digits_arrays
    ds = load_data("digits", specs)
    assert len(ds) == 1797 and ds.source == "digits"
    a = ds.inputs["input"]
    assert a.shape == (1797, 1, 8, 8) and a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    assert a.min() == 0.0 and a.max() == 1.0
    np.testing.assert_array_equal(a, x)
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    np.testing.assert_array_equal(ds.labels, y)


def test_npz_arrays_named_after_inputs(tmp_path, specs):
    x, y = rand(10, 1, 8, 8), np.arange(10) % 10
    p = tmp_path / "d.npz"
    np.savez(p, input=x, y=y.astype(np.int32))
    ds = load_data(p, specs)
    np.testing.assert_array_equal(ds.inputs["input"], x)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == y.tolist()
    assert ds.source == str(p)


@pytest.mark.parametrize("name", ["x", "images"])
def test_npz_single_array(tmp_path, specs, name):
    """A single-input model takes an array 'x', or the only array whatever its name; [N,8,8] is
    reshaped to the model's [N,1,8,8]."""
    x = rand(6, 8, 8)
    p = tmp_path / "d.npz"
    np.savez(p, **{name: x})
    ds = load_data(p, specs)
    assert ds.labels is None
    np.testing.assert_array_equal(ds.inputs["input"], x[:, None])


def test_x_preferred_over_other_arrays(specs):
    ds = load_data({"x": rand(4, 8, 8), "other": rand(4, 3)}, specs)
    assert ds.inputs["input"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize("label_name", ["y", "labels", "label"])
def test_label_names(specs, label_name):
    ds = load_data({"x": rand(5, 1, 8, 8), label_name: np.array([1, 2, 3, 4, 5], np.uint8)}, specs)
    assert ds.labels.tolist() == [1, 2, 3, 4, 5] and ds.labels.dtype == np.int64


def test_one_hot_labels_kept(specs):
    onehot = np.eye(10, dtype=np.float32)[[3, 1, 4]]
    ds = load_data({"x": rand(3, 1, 8, 8), "y": onehot}, specs)
    np.testing.assert_array_equal(ds.labels, onehot)


def test_folder_of_npy(tmp_path, specs):
    x, y = rand(7, 1, 8, 8), np.arange(7)
    np.save(tmp_path / "input.npy", x)
    np.save(tmp_path / "labels.npy", y)
    ds = load_data(tmp_path, specs)
    np.testing.assert_array_equal(ds.inputs["input"], x)
    assert ds.labels.tolist() == y.tolist()


def test_multi_input_arrays_by_name(tmp_path):
    specs = [
        InputSpec("a", ["N", 2], F32),
        InputSpec("ids", ["N", 3], np.dtype("int64")),
    ]
    a, ids, y = rand(4, 2), np.arange(12).reshape(4, 3).astype(np.int32), np.arange(4)
    p = tmp_path / "m.npz"
    np.savez(p, a=a, ids=ids, y=y)
    ds = load_data(p, specs)
    np.testing.assert_array_equal(ds.inputs["a"], a)
    assert ds.inputs["ids"].dtype == np.int64 and ds.inputs["ids"].tolist() == ids.tolist()
    assert ds.labels.tolist() == [0, 1, 2, 3]


def test_input_named_like_a_label_is_an_input():
    specs = [InputSpec("y", ["N", 2], F32)]
    ds = load_data({"y": rand(3, 2), "labels": np.array([0, 1, 0])}, specs)
    assert ds.inputs["y"].shape == (3, 2) and ds.labels.tolist() == [0, 1, 0]


def test_float64_and_uint8_data_cast_to_model_dtype(specs):
    ds = load_data({"x": rand(3, 1, 8, 8, dtype=np.float64)}, specs)
    assert ds.inputs["input"].dtype == np.float32
    raw = np.full((2, 8, 8), 255, np.uint8)
    ds = load_data({"x": raw}, specs, scale=1 / 255)
    assert ds.inputs["input"].dtype == np.float32
    np.testing.assert_allclose(ds.inputs["input"], 1.0, rtol=1e-6)


def test_limit(specs):
    ds = load_data("digits", specs, limit=10)
    assert len(ds) == 10 and len(ds.labels) == 10
    assert len(load_data("digits", specs, limit=5000)) == 1797


# ---- errors ----------------------------------------------------------------------------------------


def test_shape_mismatch_names_input_and_expected_shape(specs):
    msg = one_line_data_error(load_data, {"x": rand(3, 7, 7)}, specs)
    assert "'input'" in msg and "1, 8, 8" in msg and "[7, 7]" in msg


def test_wrong_rank_and_channels(specs):
    msg = one_line_data_error(load_data, {"x": rand(3, 3, 8, 8)}, specs)
    assert "'input'" in msg and "1, 8, 8" in msg
    msg = one_line_data_error(load_data, {"x": rand(3, 8, 8, 3)}, specs, layout="nhwc")
    assert "'input'" in msg and "1, 8, 8" in msg


def test_missing_input_of_multi_input_model():
    specs = [InputSpec("a", ["N", 2], F32), InputSpec("b", ["N", 3], F32)]
    msg = one_line_data_error(load_data, {"a": rand(3, 2), "c": rand(3, 3)}, specs)
    assert "'b'" in msg and "'N', 3" in msg and "c" in msg


def test_scalar_input(specs):
    msg = one_line_data_error(load_data, {"x": np.float32(1.0)}, specs)
    assert "'input'" in msg and "1, 8, 8" in msg


def test_name_mismatch_names_input_and_expected_shape(specs):
    msg = one_line_data_error(load_data, {"a": rand(3, 64), "b": rand(3, 64)}, specs)
    assert "'input'" in msg and "a, b" in msg
    assert "1, 8, 8" in msg


def test_dtype_mismatch_names_input_and_dtype():
    specs = [InputSpec("ids", ["N", 5], np.dtype("int64"))]
    msg = one_line_data_error(load_data, {"ids": rand(3, 5)}, specs)
    assert "'ids'" in msg and "int64" in msg and "float32" in msg


def test_dtype_mismatch_names_expected_shape():
    specs = [InputSpec("ids", ["N", 5], np.dtype("int64"))]
    msg = one_line_data_error(load_data, {"ids": rand(3, 5)}, specs)
    assert "5]" in msg


def test_string_data_for_float_input(specs):
    msg = one_line_data_error(load_data, {"x": np.array([["a"] * 64] * 2)}, specs)
    assert "'input'" in msg


def test_labels_count_mismatch(specs):
    msg = one_line_data_error(load_data, {"x": rand(3, 8, 8), "y": np.arange(4)}, specs)
    assert "labels" in msg and "4" in msg and "3" in msg


def test_inputs_with_different_sample_counts():
    specs = [InputSpec("a", ["N", 2], F32), InputSpec("b", ["N", 3], F32)]
    msg = one_line_data_error(load_data, {"a": rand(3, 2), "b": rand(4, 3)}, specs)
    assert "'a': 3" in msg and "'b': 4" in msg


def test_missing_and_unreadable_sources(tmp_path, specs):
    msg = one_line_data_error(load_data, tmp_path / "nope.npz", specs)
    assert "nope.npz" in msg and "digits" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = one_line_data_error(load_data, empty, specs)
    assert "no .npy" in msg
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all" * 10)
    msg = one_line_data_error(load_data, bad, specs)
    assert "bad.npz" in msg


def test_single_npy_file_message(tmp_path, specs):
    p = tmp_path / "one.npy"
    np.save(p, rand(3, 8, 8))
    msg = one_line_data_error(load_data, p, specs)
    assert "single .npy" in msg


# ---- conversions -----------------------------------------------------------------------------------


def test_scale_mean_std_scalar(specs):
    raw = (np.arange(2 * 64).reshape(2, 8, 8) % 17).astype(np.uint8)
    ds = load_data({"x": raw}, specs, scale=1 / 16, mean=[0.5], std=[0.25])
    want = ((raw.astype(np.float32) * np.float32(1 / 16) - 0.5) / 0.25)[:, None]
    np.testing.assert_allclose(ds.inputs["input"], want, rtol=1e-6, atol=1e-6)


def test_per_channel_mean_std_nchw():
    specs = [InputSpec("img", ["N", 3, 4, 5], F32)]
    x = rand(2, 3, 4, 5)
    mean, std = [0.1, 0.2, 0.3], [1.0, 2.0, 4.0]
    ds = load_data({"x": x}, specs, scale=2.0, mean=mean, std=std)
    want = (x * 2 - np.array(mean, np.float32)[None, :, None, None]) / np.array(std, np.float32)[
        None, :, None, None
    ]
    np.testing.assert_allclose(ds.inputs["img"], want, rtol=1e-6)


def test_nhwc_data_transposed_to_nchw_model():
    specs = [InputSpec("img", ["N", 3, 4, 5], F32)]
    x = rand(2, 4, 5, 3)
    mean, std = [0.1, 0.2, 0.3], [1.0, 2.0, 4.0]
    ds = load_data({"x": x}, specs, mean=mean, std=std, layout="nhwc")
    assert ds.inputs["img"].shape == (2, 3, 4, 5) and ds.inputs["img"].flags["C_CONTIGUOUS"]
    # per-channel statistics apply to the data's own (last) channel axis, then the transpose
    want = ((x - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ds.inputs["img"], want, rtol=1e-6)
    # without --layout the same data are refused, with a hint
    msg = one_line_data_error(load_data, {"x": x}, specs)
    assert "'img'" in msg and "3, 4, 5" in msg and "--layout" in msg


def test_nchw_data_transposed_to_nhwc_model():
    specs = [InputSpec("img", ["N", 4, 5, 3], F32)]
    x = rand(2, 3, 4, 5)
    ds = load_data({"x": x}, specs, layout="nchw")
    np.testing.assert_array_equal(ds.inputs["img"], x.transpose(0, 2, 3, 1))
    # data already in the model's layout are left alone
    y = rand(2, 4, 5, 3)
    np.testing.assert_array_equal(load_data({"x": y}, specs, layout="nhwc").inputs["img"], y)


def test_digits_nhwc_with_scale(specs, digits_arrays):
    x, _ = digits_arrays
    raw = (x[:, 0] * 16).astype(np.uint8)[..., None]  # [N, 8, 8, 1] pixel counts 0..16
    ds = load_data({"x": raw}, specs, scale=1 / 16, layout="nhwc")
    np.testing.assert_allclose(ds.inputs["input"], x, rtol=1e-6)


def test_per_channel_stats_need_images(specs):
    msg = one_line_data_error(load_data, {"x": rand(2, 8, 8)}, specs, mean=[0.1, 0.2])
    assert "4-D" in msg


# ---- Dataset.split -----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 500), st.floats(0.01, 0.9), st.integers(0, 2**31))
def test_split_sizes_and_disjoint(n, fraction, seed):
    ds = Dataset({"a": np.arange(n)[:, None].astype(np.float32)}, np.arange(n) * 10)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        with pytest.raises(DataError):
            ds.split(fraction, seed)
        return
    train, val = ds.split(fraction, seed)
    assert len(val) == k and len(train) == n - k
    tr, va = train.inputs["a"][:, 0].astype(int), val.inputs["a"][:, 0].astype(int)
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(n))
    # labels travel with their samples; both parts keep the original order
    assert (train.labels == tr * 10).all() and (val.labels == va * 10).all()
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    # deterministic for a seed
    again = ds.split(fraction, seed)[1]
    np.testing.assert_array_equal(again.inputs["a"], val.inputs["a"])


def test_split_examples(specs):
    ds = load_data("digits", specs)
    train, val = ds.split(0.1, seed=0)
    assert (len(train), len(val)) == (1617, 180)
    other = ds.split(0.1, seed=1)[1]
    assert not np.array_equal(other.labels, val.labels) or not np.array_equal(
        other.inputs["input"], val.inputs["input"]
    )
    no_labels = Dataset({"a": np.zeros((10, 2), np.float32)})
    tr, va = no_labels.split(0.3)
    assert (len(tr), len(va), tr.labels, va.labels) == (7, 3, None, None)
    with pytest.raises(DataError):
        Dataset({"a": np.zeros((1, 2), np.float32)}).split(0.5)


# ---- through the CLI -------------------------------------------------------------------------------


def test_cli_evaluate_with_conversions(tmp_path, digits_arrays):
    """evaluate --scale/--layout on raw nhwc pixels gives the same accuracy as the ready-made data."""
    x, y = digits_arrays
    p = tmp_path / "raw.npz"
    np.savez(p, images=(x[:300, 0] * 16).astype(np.uint8)[..., None], labels=y[:300])
    runner = CliRunner()
    args = ["evaluate", str(MODEL), "--providers", "cpu", "--batch-sizes", "1", "--runs", "1", "--json"]
    r = runner.invoke(cli, [*args, "--data", str(p), "--scale", "0.0625", "--layout", "nhwc"])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.npz"
    np.savez(ref, x=x[:300], y=y[:300])
    r2 = runner.invoke(cli, [*args, "--data", str(ref)])
    assert r2.exit_code == 0, r2.output
    a, b = json.loads(r.stdout), json.loads(r2.stdout)
    assert a["samples"] == b["samples"] == 300
    assert a["accuracy"] == b["accuracy"] and a["accuracy"] > 0.9


def test_cli_data_error_is_one_line(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x=rand(3, 7, 7))
    r = CliRunner().invoke(cli, ["evaluate", str(MODEL), "--data", str(p), "--providers", "cpu"])
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "'input'" in lines[0], r.stderr
    assert "Traceback" not in r.output
