"""The command line: every command runs; bad input gives one line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "models" / "digits_cnn.onnx"


def run(*args):
    p = subprocess.run(
        [sys.executable, "-m", "onnxadmm_cli.main", *map(str, args)], capture_output=True, text=True
    )
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, out, err):
    assert rc != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_inspect_text_and_json():
    rc, out, err = run("inspect", DIGITS)
    assert rc == 0, err
    assert "conv1.weight" in out and "38,160" in out
    rc, out, _ = run("inspect", DIGITS, "--json")
    d = json.loads(out)
    assert d["totals"]["compressible_params"] == 38160 and d["unsupported"] == []


def test_verify_digits_passes():
    rc, out, err = run("verify", DIGITS)
    assert rc == 0, out + err
    assert "writer round trip" in out and "FAIL" not in out


def test_verify_with_digits_data():
    rc, out, err = run("verify", DIGITS, "--data", "digits", "--json")
    assert rc == 0, out + err
    assert json.loads(out)["ok"] is True


@pytest.mark.parametrize("kind", ["missing", "not_onnx", "truncated", "folder"])
def test_bad_model_files(tmp_path, kind):
    if kind == "missing":
        p = tmp_path / "nope.onnx"
    elif kind == "not_onnx":
        p = tmp_path / "x.onnx"
        p.write_text("this is not a model\n" * 20)
    elif kind == "truncated":
        p = tmp_path / "t.onnx"
        p.write_bytes(DIGITS.read_bytes()[: DIGITS.stat().st_size // 2])
    else:
        p = tmp_path
    for cmd in ("inspect", "verify"):
        line = one_line_error(*run(cmd, p))
        assert str(p.name) in line or str(p) in line


def test_external_data_outside_folder_refused(tmp_path):
    m = onnx.load(DIGITS)
    d = tmp_path / "m"
    d.mkdir()
    onnx.save_model(m, d / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    m2 = onnx.load(d / "m.onnx", load_external_data=False)
    for t in m2.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../../etc/passwd"
    (d / "evil.onnx").write_bytes(m2.SerializeToString())
    line = one_line_error(*run("verify", d / "evil.onnx"))
    assert "outside" in line


def test_unsupported_op_error(tmp_path):
    m = onnx.load(DIGITS)
    m.graph.node[1].op_type = "FancyRelu"
    m.graph.node[1].domain = "com.example"
    m.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    p = tmp_path / "u.onnx"
    onnx.save_model(m, p)
    line = one_line_error(*run("verify", p))
    assert "FancyRelu" in line and "com.example" in line and "relu1" in line and "1 node affected" in line


def test_nothing_to_compress(models_dir):
    p = models_dir / "onnxruntime-pypi-wheel" / "logreg_iris.onnx"
    line = one_line_error(*run("verify", p))
    assert "nothing to compress" in line


def test_input_never_modified(tmp_path):
    p = tmp_path / "d.onnx"
    shutil.copy(DIGITS, p)
    before = p.read_bytes()
    run("verify", p)
    run("inspect", p)
    assert p.read_bytes() == before


def test_debug_shows_traceback(tmp_path):
    rc, out, err = run("--debug", "inspect", tmp_path / "nope.onnx")
    assert rc != 0 and "Traceback" in err
