"""compress end to end on models/digits_cnn.onnx with the built-in digits data, through the library
(``onnxadmm.compress.pipeline.compress``) and the CLI (click's test runner), plus the ADMM engine's
batching and rho schedule.

Every training run is tiny (2 ADMM iterations, 1 retraining epoch, 2 batches per unit): the tests
check plumbing, bookkeeping and reproducibility, not accuracy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from onnxadmm_cli.main import cli

from onnxadmm.compress.admm import Engine, Unit
from onnxadmm.compress.config import CompressConfig
from onnxadmm.compress.objective import training_heads
from onnxadmm.compress.pipeline import compress, format_report
from onnxadmm.compress.pruning import allocate
from onnxadmm.data import Dataset, input_specs_of, load_data
from onnxadmm.errors import ConfigError, DataError
from onnxadmm.importer.graph import OnnxGraphModule
from onnxadmm.modelio import load_model

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models train on one thread
WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
SIZES = {"conv1.weight": 144, "conv2.weight": 4608, "fc1.weight": 32768, "fc2.weight": 640}
FAST = {
    "admm_iterations": 2,
    "retrain_epochs": 1,
    "min_batches": 1,
    "max_batches_per_epoch": 2,
    "batch_size": 64,
}
FAST_TOML = "\n".join(f"{k} = {v}" for k, v in FAST.items()) + "\n"
CLI_FAST = [
    "--admm-iterations",
    "2",
    "--retrain-epochs",
    "1",
    "--max-batches-per-epoch",
    "2",
    "--batch-size",
    "64",
]
REPORT_KEYS = {"pruning_rate", "layers", "accuracy", "agreement", "file_bytes", "seconds", "config"}


# ---- helpers -------------------------------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """Every weight of an ONNX file as a dense array: initializers, sparse initializers densified,
    and weights written in onnxadmm's compact storage decoded by onnx's reference evaluator running
    their decoder nodes alone (the decoder's own constants left out)."""
    from onnx.reference import ReferenceEvaluator

    from onnxadmm.export.storage import decoder_nodes

    m = onnx.load(str(path))
    by_weight = decoder_nodes(m)
    decoder = [n for nodes in by_weight.values() for n in nodes]
    made = [w for w, nodes in by_weight.items() if nodes]
    used = {i for n in decoder for i in n.input}
    out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name not in used}
    if made:
        g = onnx.helper.make_graph(
            decoder,
            "decode",
            [],
            [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in made],
            [t for t in m.graph.initializer if t.name in used],
        )
        sub = onnx.helper.make_model(g, opset_imports=m.opset_import)
        out.update(zip(made, ReferenceEvaluator(sub).run(None, {})))
    for sp in m.graph.sparse_initializer:
        values = numpy_helper.to_array(sp.values)
        idx = numpy_helper.to_array(sp.indices)
        dense = np.zeros(tuple(sp.dims), dtype=values.dtype)
        if idx.ndim == 1:
            dense.flat[idx] = values
        else:
            dense[tuple(idx.T)] = values
        out[sp.values.name] = dense
    return out


def sparse_names(path: Path) -> set[str]:
    return {sp.values.name for sp in onnx.load(str(path)).graph.sparse_initializer}


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = onnx_weights(a), onnx_weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def trained_rate(rep: dict) -> float:
    """The pruning rate training reached: cutting dead channels out after it (shrink) folds a
    reader's weights on a constant channel into its bias, which the written rate counts as removed."""
    removed = (rep.get("shrunk") or {}).get("nonzero_removed", 0)
    return rep["weights"]["total"] / (rep["weights"]["nonzero"] + removed)


def check_report(rep: dict, target: float = 20.0) -> None:
    assert REPORT_KEYS <= rep.keys()
    # --rate counts the weights written (dead channels cut out): training keeps at least as many
    assert abs(rep["pruning_rate"] - target) / target < 0.02
    assert trained_rate(rep) <= rep["pruning_rate"] * 1.0001
    assert [x["name"] for x in rep["layers"]] == WEIGHTS
    for x in rep["layers"]:
        assert {"name", "shape", "params", "nonzero", "rate"} <= x.keys()
        assert int(np.prod(x["shape"])) == x["params"] == SIZES[x["name"]]
        assert 1 <= x["nonzero"] <= x["params"]
        assert x["rate"] == pytest.approx(x["params"] / x["nonzero"])
    total = sum(x["params"] for x in rep["layers"])
    nonzero = sum(x["nonzero"] for x in rep["layers"])
    assert rep["pruning_rate"] == pytest.approx(total / nonzero)
    assert set(rep["file_bytes"]) >= {"original", "compressed"}
    assert rep["file_bytes"]["original"] == MODEL.stat().st_size
    assert rep["seconds"] > 0
    assert rep["config"]["rate"] == pytest.approx(target)


def check_output_matches_report(out: Path, rep: dict) -> None:
    """Non-zeros counted in the written ONNX file are those of the report."""
    w = onnx_weights(out)
    for x in rep["layers"]:
        assert list(w[x["name"]].shape) == x.get("shape_after", x["shape"])
        assert int(np.count_nonzero(w[x["name"]])) == x["nonzero"], x["name"]
    assert rep["file_bytes"]["compressed"] == out.stat().st_size


def interrupt_training_at(monkeypatch, n: int):
    """Make the n-th training epoch (call of ``Engine.train_epoch``) raise KeyboardInterrupt, as
    Ctrl-C would; returns a function that puts the real method back."""
    real = Engine.train_epoch
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Engine, "train_epoch", flaky)
    return lambda: monkeypatch.setattr(Engine, "train_epoch", real)


@pytest.fixture(scope="module")
def digits():
    ds = load_data("digits", input_specs_of(load_model(MODEL)))
    return ds.inputs["input"], ds.labels


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compress")


@pytest.fixture(scope="module")
def baseline(work):
    """One reference run: digits, 20x, seed 0, auto format, progressive (2 steps), tiny training."""
    src = work / "in.onnx"
    shutil.copy(MODEL, src)
    before = sha(src)
    out = work / "base.onnx"
    logs: list[str] = []
    rep = compress(src, out, "digits", rate="20x", seed=0, log=logs.append, quiet=True, **FAST)
    return {"rep": rep, "src": src, "sha": before, "out": out, "logs": logs}


@pytest.fixture(scope="module")
def unshrunk(work):
    """The baseline's run with --no-shrink: every layer keeps its shape (dead channels stay as zeros)."""
    out = work / "unshrunk.onnx"
    rep = compress(MODEL, out, "digits", rate="20x", seed=0, shrink=False, quiet=True, **FAST)
    return {"rep": rep, "out": out}


@pytest.fixture()
def model_copy(tmp_path) -> Path:
    p = tmp_path / "model.onnx"
    shutil.copy(MODEL, p)
    return p


# ---- the library ---------------------------------------------------------------------------------


def test_output_written_input_unchanged(baseline):
    out, rep = baseline["out"], baseline["rep"]
    assert out.is_file() and out.stat().st_size > 0
    assert sha(baseline["src"]) == baseline["sha"]
    assert sha(MODEL) != sha(out)
    onnx.checker.check_model(onnx.load(str(out)))
    # the checkpoint is removed after a completed run; the report is written beside the output
    assert not Path(f"{out}.ckpt").exists()
    assert Path(rep["report_path"]) == out.with_name("base.report.json")


def test_report_contents(baseline):
    rep = baseline["rep"]
    check_report(rep)
    on_disk = json.loads(Path(rep["report_path"]).read_text())
    assert on_disk == json.loads(json.dumps({k: v for k, v in rep.items() if k != "report_path"}))
    assert rep["target_rate"] == 20.0
    # the report holds the settings used: the automatic distillation weight resolved (labels, classifier)
    # and the final step's retraining (20x: no restart, as the other steps)
    resolved = {
        "distill": 1.0,
        "final_retrain_lr": 1e-3,
        "final_retrain_epochs": FAST["retrain_epochs"],
        "allocation_power": 0.3,
        "epochs_per_iteration": 1.0,
        "importance": "magnitude",  # auto, with labels
    }
    assert rep["config"] == CompressConfig(rate=20, seed=0, **resolved, **FAST).validate().to_dict()
    acc = rep["accuracy"]
    assert set(acc) == {"original", "compressed"}
    assert 0 <= acc["compressed"] <= 1 and acc["original"] > 0.9
    assert 0 <= rep["agreement"] <= 1
    assert rep["file_bytes"]["compressed"] < rep["file_bytes"]["original"]
    assert rep["steps"] == pytest.approx([20**0.5, 20.0])
    assert [h["kind"] for h in rep["history"]] == ["admm", "admm", "retrain"] * 2
    # the report's layers follow allocate() at the rate training kept (lower than --rate: dead channels
    # are cut out, a reader's weights on a dead channel folded into its bias)
    kept = {x["name"]: x.get("nonzero_trained", x["nonzero"]) for x in rep["layers"]}
    assert rep["training_rate"] == pytest.approx(sum(SIZES.values()) / sum(kept.values()))
    assert rep["training_rate"] < rep["pruning_rate"]
    planned = allocate(SIZES, rep["training_rate"])
    assert all(abs(kept[n] - planned[n]) <= max(2, 0.01 * planned[n]) for n in SIZES), (kept, planned)
    removed = sum(x.get("nonzero_trained", x["nonzero"]) - x["nonzero"] for x in rep["layers"])
    assert removed == ((rep["shrunk"] or {}).get("nonzero_removed") or 0)


def test_output_nonzeros_match_report(baseline):
    check_output_matches_report(baseline["out"], baseline["rep"])


def test_report_metrics_match_onnxruntime(baseline, digits):
    """accuracy/agreement in the report are those of onnxruntime on the held-out 10% (seed 0)."""
    x, y = digits
    _, val = Dataset({"input": x}, y).split(0.1, 0)
    assert baseline["rep"]["validation"]["samples"] == len(val) == 180
    new = ort_logits(baseline["out"], val.inputs["input"]).argmax(1)
    old = ort_logits(MODEL, val.inputs["input"]).argmax(1)
    acc = baseline["rep"]["accuracy"]
    assert acc["compressed"] == pytest.approx(float((new == val.labels).mean()))
    assert acc["original"] == pytest.approx(float((old == val.labels).mean()))
    assert baseline["rep"]["agreement"] == pytest.approx(float((new == old).mean()))


def test_auto_format_picks_the_smallest_storage_per_layer(baseline):
    """auto: each pruned layer as raw values + packed positions (compact), an ONNX sparse initializer
    (values + int64 indices) or dense, whichever adds the fewest bytes; priced independently here."""
    from onnxadmm.export.storage import METADATA_KEY, encode_sparse, storage_bytes

    rep, out = baseline["rep"], baseline["out"]
    weights = onnx_weights(out)
    compact, coo = set(), set()
    for x in rep["layers"]:
        w = weights[x["name"]]
        sizes = storage_bytes(encode_sparse(w))
        as_coo = x["nonzero"] * (4 + 8) + 64
        if sizes["total"] + sizes["nodes"] < min(w.nbytes, as_coo):
            compact.add(x["name"])
        elif x["nonzero"] * (4 + 8) < x["params"] * 4:
            coo.add(x["name"])
    assert rep["format"]["packed_error"] is None
    assert set(rep["format"]["codebook_tensors"]) == compact
    assert set(rep["format"]["sparse_tensors"]) == coo == sparse_names(out)
    assert "fc1.weight" in compact and "conv1.weight" not in compact | coo
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert set(json.loads(meta[METADATA_KEY])) == compact
    # the compact file is smaller than the same weights written as sparse initializers
    assert out.stat().st_size < rep["file_bytes"]["original"]


def test_rho_history_in_report(baseline):
    admm_rho = [h["rho"] for h in baseline["rep"]["history"] if h["kind"] == "admm"]
    # rho starts from cfg.rho in each progressive step and grows by rho_multiplier per ADMM iteration
    d = CompressConfig()
    per_step = [d.rho, min(d.rho * d.rho_multiplier, d.rho_max)]
    assert admm_rho == pytest.approx(per_step * 2)


@pytest.mark.parametrize("fmt", ["dense", "sparse", "codebook"])
def test_formats(baseline, tmp_path, digits, fmt):
    out = tmp_path / f"{fmt}.onnx"
    rep = compress(MODEL, out, "digits", rate=20, seed=0, fmt=fmt, quiet=True, **FAST)
    check_report(rep)
    check_output_matches_report(out, rep)
    # the storage format does not change the weights (same seed as the baseline)
    assert same_weights(out, baseline["out"])
    x = digits[0][:64]
    np.testing.assert_allclose(ort_logits(out, x), ort_logits(baseline["out"], x), rtol=1e-5, atol=1e-5)
    if fmt == "dense":
        assert sparse_names(out) == set() and rep["format"]["sparse_tensors"] == []
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    elif fmt == "sparse":
        pruned = {x["name"] for x in rep["layers"] if x["nonzero"] < x["params"]}
        assert pruned and sparse_names(out) == pruned == set(rep["format"]["sparse_tensors"])
        assert out.stat().st_size < baseline["rep"]["file_bytes"]["original"]
        # auto (raw values + packed positions where that is smaller) beats int64-indexed COO
        assert baseline["rep"]["file_bytes"]["compressed"] < rep["file_bytes"]["compressed"]
    else:  # codebook: every pruned layer as raw values + packed positions, decoded at load
        pruned = {x["name"] for x in rep["layers"] if x["nonzero"] < x["params"]}
        assert pruned and set(rep["format"]["codebook_tensors"]) == pruned and not sparse_names(out)
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_same_seed_same_weights_other_seed_differs(baseline, tmp_path):
    a = tmp_path / "a.onnx"
    compress(MODEL, a, "digits", rate=20, seed=0, quiet=True, **FAST)
    assert a.read_bytes() == baseline["out"].read_bytes()
    b = tmp_path / "b.onnx"
    rep = compress(MODEL, b, "digits", rate=20, seed=1, quiet=True, **FAST)
    assert rep["config"]["seed"] == 1
    assert not same_weights(a, b)


def test_distillation_without_labels(tmp_path, digits):
    logs: list[str] = []
    out = tmp_path / "d.onnx"
    rep = compress(MODEL, out, {"x": digits[0]}, rate=20, seed=0, log=logs.append, quiet=True, **FAST)
    assert any("distillation" in s for s in logs)
    check_report(rep)
    check_output_matches_report(out, rep)
    assert rep["accuracy"] is None
    assert 0 <= rep["agreement"] <= 1
    assert all(h["val_accuracy"] is None for h in rep["history"])
    assert all(np.isfinite(h["loss"]) for h in rep["history"])


def test_pseudo_labels_add_cross_entropy_on_the_originals_top1():
    from torch.nn import functional as F

    from onnxadmm.compress.objective import Head, loss_fn

    torch.manual_seed(0)
    heads = [Head("y", "logits", 1)]
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    kl = loss_fn(heads, [s], None, [t], 0.0, 2.0)
    both = loss_fn(heads, [s], None, [t], 0.0, 2.0, pseudo=0.5)
    assert float(both - kl) == pytest.approx(0.5 * float(F.cross_entropy(s, t.argmax(1))), rel=1e-5)
    labels = torch.arange(16) % 10  # with labels the real ones are used, not the original's guesses
    assert float(loss_fn(heads, [s], labels, [t], 1.0, 2.0, pseudo=0.5)) == pytest.approx(
        float(loss_fn(heads, [s], labels, [t], 1.0, 2.0)), rel=1e-6
    )


def test_labels_train_the_first_output_and_distill_the_others():
    """Labels describe the first output; a second (regression) output is distilled from the original
    even when distillation is off for the first (weight 1), so it is not left to drift."""
    from torch.nn import functional as F

    from onnxadmm.compress.objective import Head, loss_fn

    torch.manual_seed(0)
    heads = [Head("logits", "logits", 1), Head("score", "regression")]
    s, t = [torch.randn(16, 10), torch.randn(16, 1)], [torch.randn(16, 10), torch.randn(16, 1)]
    labels = torch.arange(16) % 10
    got = float(loss_fn(heads, s, labels, t, 0.0, 2.0))
    assert got == pytest.approx(float(F.cross_entropy(s[0], labels) + F.mse_loss(s[1], t[1])), rel=1e-5)
    single = float(loss_fn(heads[:1], s[:1], labels, t[:1], 0.0, 2.0))  # one output: labels alone
    assert single == pytest.approx(float(F.cross_entropy(s[0], labels)), rel=1e-6)


def test_sigmoid_classifier_head_trains_on_the_sigmoid_input():
    """A rank-2 output made by Sigmoid is a classifier whose logits are the Sigmoid's input; a
    rank-4 Sigmoid map (segmentation) stays a regression output."""
    from onnx import TensorProto, helper

    from onnxadmm.compress.objective import Head, loss_fn

    def model(shape):
        g = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert [(h.name, h.kind) for h in training_heads(model([None, 10]))] == [("z", "sigmoid")]
    assert [h.kind for h in training_heads(model([1, 1, 8, 8]))] == ["regression"]

    torch.manual_seed(0)
    heads = [Head("z", "sigmoid", 1)]
    t = torch.randn(8, 10) * 3
    # distillation: zero gradient where the student's scores equal the original's, not elsewhere
    s = t.clone().requires_grad_(True)
    loss_fn(heads, [s], None, [t], 0.0, 2.0).backward()
    assert float(s.grad.abs().max()) < 1e-6
    s = (t + torch.randn(8, 10)).requires_grad_(True)
    loss_fn(heads, [s], None, [t], 0.0, 2.0).backward()
    assert float(s.grad.abs().max()) > 1e-3
    # with labels: softmax cross-entropy on the logits (same argmax as the probabilities)
    labels = torch.arange(8) % 10
    from torch.nn import functional as F

    assert float(loss_fn(heads, [t], labels, None, 0.0, 2.0)) == pytest.approx(
        float(F.cross_entropy(t, labels)), rel=1e-6
    )
    # one column: a binary classifier (binary cross-entropy on the logit, class = logit > 0)
    from onnxadmm.compress.objective import predictions

    z = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    y = torch.tensor([1, 0, 0, 1])
    assert predictions(heads[0], z).tolist() == [1, 0, 1, 0]
    assert float(loss_fn(heads, [z], y, None, 0.0, 2.0)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(z[:, 0], y.float())), rel=1e-6
    )
    assert float(loss_fn(heads, [z], y[:, None], None, 0.0, 2.0)) == pytest.approx(
        float(loss_fn(heads, [z], y, None, 0.0, 2.0)), rel=1e-6
    )
    # without labels: the original's own decisions as the hard targets, and zero gradient at equality
    s = z.clone().requires_grad_(True)
    total = loss_fn(heads, [s], None, [z], 0.0, 1.0, pseudo=1.0)
    hard = F.binary_cross_entropy_with_logits(z[:, 0], (z[:, 0] > 0).float())
    soft = F.binary_cross_entropy_with_logits(z, torch.sigmoid(z), reduction="sum") / 4
    assert float(total.detach()) == pytest.approx(float(hard + soft), rel=1e-5)


def test_labels_with_distillation_and_sgd(tmp_path):
    out = tmp_path / "ds.onnx"
    rep = compress(
        MODEL,
        out,
        "digits",
        rate=10,
        distill=0.5,
        temperature=2.0,
        optimizer="sgd",
        progressive=False,
        quiet=True,
        **FAST,
    )
    check_report(rep, target=10.0)
    check_output_matches_report(out, rep)
    assert rep["steps"] == [10.0] and rep["accuracy"] is not None
    assert all(np.isfinite(h["loss"]) for h in rep["history"])


def test_iterable_of_batches(baseline, tmp_path, digits):
    """(x, y) batches (torch tensors here) give the same data, hence the same weights, as 'digits'."""
    x, y = digits
    batches = (
        (torch.from_numpy(x[i : i + 100]), torch.from_numpy(y[i : i + 100])) for i in range(0, len(x), 100)
    )
    out = tmp_path / "it.onnx"
    rep = compress(MODEL, out, batches, rate=20, seed=0, quiet=True, **FAST)
    check_report(rep)
    assert rep["accuracy"] is not None
    assert same_weights(out, baseline["out"])


def test_whole_array_pair(baseline, tmp_path, digits):
    """``data=(x, y)`` with whole arrays is one data set (not two batches): same weights as 'digits'."""
    x, y = digits
    out = tmp_path / "pair.onnx"
    rep = compress(MODEL, out, (x, y), rate=20, seed=0, quiet=True, **FAST)
    assert rep["accuracy"] is not None
    assert same_weights(out, baseline["out"])


def test_batches_that_do_not_stack(tmp_path, digits):
    x, _ = digits
    with pytest.raises(DataError, match="do not stack"):
        compress(MODEL, tmp_path / "bad.onnx", [x[:10], x[:10].reshape(10, -1)[:, :3]], rate=20, quiet=True, **FAST)


def test_top_level_api(baseline, tmp_path):
    """``onnxadmm.compress(...)`` is the pipeline (the package is callable): same run, same weights;
    ``onnxadmm.CompressConfig`` is the config class, and the submodules stay importable."""
    import onnxadmm
    import onnxadmm.compress.pipeline as pipeline

    out = tmp_path / "api.onnx"
    cfg = onnxadmm.CompressConfig(rate=20, seed=0, **FAST)
    rep = onnxadmm.compress(MODEL, out, "digits", config=cfg, quiet=True)
    check_report(rep)
    assert same_weights(out, baseline["out"])
    assert pipeline.compress is compress and onnxadmm.CompressConfig is CompressConfig


class _LabelsDropped(Exception):
    pass


def test_torch_dataloader_batches(tmp_path, digits):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=256)

    def log(line):
        if "no labels" in line:
            raise _LabelsDropped(line)

    rep = compress(MODEL, tmp_path / "dl.onnx", loader, rate=20, seed=0, log=log, quiet=True, **FAST)
    assert rep["accuracy"] is not None


@pytest.mark.parametrize("n", [2, 5], ids=["inside-admm-phase", "second-step"])
def test_resume_equals_uninterrupted_run(baseline, tmp_path, monkeypatch, n):
    """Interrupt at the n-th unit, resume from the checkpoint: the result is bit-identical."""
    out = tmp_path / "r.onnx"
    ckpt = tmp_path / "r.onnx.ckpt"
    restore = interrupt_training_at(monkeypatch, n)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        compress(MODEL, out, "digits", rate=20, seed=0, log=logs.append, quiet=True, **FAST)
    assert ckpt.is_file() and not out.exists()
    assert any("--resume" in s for s in logs)
    blob = torch.load(ckpt, weights_only=False)
    assert blob["unit"] == n - 2 and len(blob["history"]) == n - 1

    restore()
    rep = compress(MODEL, out, "digits", rate=20, seed=0, resume=True, quiet=True, **FAST)
    assert not ckpt.exists()
    assert out.read_bytes() == baseline["out"].read_bytes()
    assert rep["history"] == baseline["rep"]["history"]
    assert rep.get("optimizer_steps") == baseline["rep"].get("optimizer_steps")


def test_resume_errors(tmp_path, monkeypatch):
    out = tmp_path / "r.onnx"
    with pytest.raises(ConfigError, match="no checkpoint"):
        compress(MODEL, out, "digits", resume=True, quiet=True, **FAST)
    restore = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        compress(MODEL, out, "digits", seed=0, quiet=True, **FAST)
    restore()
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        compress(MODEL, out, "digits", seed=1, resume=True, quiet=True, **FAST)
    ckpt = out.with_name(out.name + ".ckpt")
    blob = torch.load(ckpt, weights_only=False)
    del blob["meta"]["config"]["restart_rate"]  # as written by an older version
    torch.save(blob, ckpt)
    with pytest.raises(ConfigError, match="another onnxadmm version"):
        compress(MODEL, out, "digits", seed=0, resume=True, quiet=True, **FAST)
    other = tmp_path / "other.onnx"
    m = onnx.load(str(MODEL))
    m.doc_string = "a different file"
    onnx.save(m, str(other))
    with pytest.raises(ConfigError, match="another model"):
        compress(other, out, "digits", seed=0, resume=True, quiet=True, **FAST)


def test_output_equal_input_refused(model_copy):
    before = sha(model_copy)
    with pytest.raises(ConfigError, match="--force"):
        compress(model_copy, model_copy, "digits", quiet=True, **FAST)
    assert sha(model_copy) == before


@pytest.mark.parametrize("rate", ["0.5x", "0x", "-3", "abc", "100%"])
def test_bad_rates_refused(tmp_path, rate):
    with pytest.raises(ConfigError, match="rate") as ei:
        compress(MODEL, tmp_path / "o.onnx", "digits", rate=rate, quiet=True)
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "o.onnx").exists()


def test_force_overwrite_reports_the_original(model_copy, digits):
    x, y = digits
    _, val = Dataset({"input": x}, y).split(0.1, 0)
    original_acc = float((ort_logits(model_copy, val.inputs["input"]).argmax(1) == val.labels).mean())
    size = model_copy.stat().st_size
    rep = compress(model_copy, model_copy, "digits", rate=20, seed=0, force=True, quiet=True, **FAST)
    check_output_matches_report(model_copy, rep)  # the file itself is the compressed model
    assert rep["file_bytes"]["original"] == size
    assert rep["accuracy"]["original"] == pytest.approx(original_acc)


def test_rate_counts_the_weights_written(baseline, unshrunk):
    """At 20x the digits CNN's last pruning step leaves channels dead that the writer cuts out with
    the weights on them: training keeps more, so that the file holds 1/20 of the weights (within
    the search's 0.2%) rather than fewer; without shrinking, what training keeps is written."""
    rep = baseline["rep"]
    assert rep["shrunk"]["nonzero_removed"] > 0
    assert 20.0 <= rep["pruning_rate"] <= 20.0 * 1.004
    assert trained_rate(rep) < 20.0 / 1.01
    assert any("are written once the dead channels are cut out" in x for x in baseline["logs"])
    assert unshrunk["rep"]["pruning_rate"] == pytest.approx(20.0, rel=0.002)


def test_bad_layer_names_refused():
    with pytest.raises(ConfigError, match="nope.weight"):
        compress(MODEL, "/nonexistent/x.onnx", "digits", layer_rates={"nope.weight": 4}, quiet=True)
    with pytest.raises(ConfigError, match="zzz"):
        compress(MODEL, "/nonexistent/x.onnx", "digits", exclude=["zzz*"], quiet=True)


def test_progressive_steps_with_exclusion_and_fixed_rate(tmp_path):
    kw = dict(rate=8, exclude=["conv2.weight"], layer_rates={"fc1.weight": 1000}, quiet=True, **FAST)
    # fc1 at 1000x leaves most of conv2's filters unread (conv2 stays dense): they are cut out, so the
    # file is sparser than 8x even with everything else kept
    for name, progressive in (("one", False), ("prog", True)):
        rep = compress(MODEL, tmp_path / f"{name}.onnx", "digits", progressive=progressive, step_factor=2, **kw)
        assert rep["pruning_rate"] >= 8.0 and rep["training_rate"] <= rep["pruning_rate"]
        assert 1.0 <= rep["training_rate"] < 8.0 / 1.01
        layers = {x["name"]: x for x in rep["layers"]}
        assert layers["fc1.weight"]["nonzero"] == round(SIZES["fc1.weight"] / 1000)
        assert layers["conv2.weight"].get("nonzero_trained") == SIZES["conv2.weight"]  # excluded: dense


# ---- the engine ------------------------------------------------------------------------------------

def test_sparse_input_starts_the_steps_at_its_own_rate(unshrunk, tmp_path):
    """A model already pruned 20x, compressed to 40x with step factor 8: one step (20x -> 40x), not
    the two steps from dense (6.3x, 40x)."""
    logs: list[str] = []
    more = tmp_path / "more.onnx"
    rep = compress(unshrunk["out"], more, "digits", rate=40, log=logs.append, quiet=True, shrink=False, **FAST)
    assert rep["steps"] == [40.0]
    assert any("already 20x sparse" in line for line in logs), logs
    assert rep["pruning_rate"] == pytest.approx(40.0, rel=0.02)
    # the input's zeros are pruned weights: they stay pruned
    before, after = onnx_weights(unshrunk["out"]), onnx_weights(more)
    for n in SIZES:
        assert not np.any((before[n] == 0) & (after[n] != 0)), n
    # from dense, the same settings take two steps
    rep = compress(MODEL, tmp_path / "dense.onnx", "digits", rate=40, quiet=True, **FAST)
    assert len(rep["steps"]) == 2



def make_engine(cfg: CompressConfig, n: int = 16, ids_as_labels: bool = False) -> Engine:
    """An Engine on the digits model with ``n`` training samples; ``ids_as_labels`` makes each label
    the sample's index (for the batching checks)."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    x = load_data("digits", input_specs_of(proto), limit=n).inputs["input"]
    train = Dataset({"input": x}, np.arange(n) if ids_as_labels else np.arange(n) % 10)
    keep = [allocate(SIZES, 4.0)]
    return Engine(module, heads, train, train, None, cfg.validate(), keep, log=lambda s: None, quiet=True)


def n_batches(epochs: float = 1.0, **cfg) -> int:
    return len(list(make_engine(CompressConfig(**cfg), ids_as_labels=True).batches(epochs)))


def test_engine_rho_schedule():
    cfg = CompressConfig(
        rho=0.1, rho_multiplier=3.0, rho_max=0.5, batch_size=8, min_batches=1, max_batches_per_epoch=1
    )
    e = make_engine(cfg)
    e.start_admm(0)
    assert e.state.rho == 0.1
    opt = e.make_optimizer(cfg.lr)
    used = [e.train_epoch(Unit("admm", 0, i), opt, "t")["rho"] for i in range(5)]
    assert used == pytest.approx([0.1, 0.3, 0.5, 0.5, 0.5])  # x3 per iteration, capped at rho_max
    assert e.state.rho == 0.5
    # the penalty is rho/2 ||W - Z + U||^2 with the current rho
    with torch.no_grad():
        dist = sum(float((e.params[n] - e.state.Z[n] + e.state.U[n]).pow(2).sum()) for n in e.names)
        assert float(e.penalty()) == pytest.approx(0.5 * 0.5 * dist, rel=1e-5)
    # Z is feasible after each Z-step
    for n in e.names:
        assert int((e.state.Z[n] != 0).sum()) <= e.keep[0][n]
    # retraining leaves rho alone; a new ADMM phase starts again from cfg.rho
    e.hard_prune(0)
    e.train_epoch(Unit("retrain", 0, 0), e.make_optimizer(cfg.retrain_lr), "t")
    assert e.state.rho == 0.5
    e.start_admm(0)
    assert e.state.rho == 0.1


def test_engine_hard_prune_keeps_masks():
    cfg = CompressConfig(batch_size=8, min_batches=1, max_batches_per_epoch=2)
    e = make_engine(cfg)
    e.hard_prune(0)
    e.train_epoch(Unit("retrain", 0, 0), e.make_optimizer(1e-2), "t")
    for n in e.names:
        w = e.params[n].detach()
        assert int((w != 0).sum()) <= e.keep[0][n]
        if e.keep[0][n] < w.numel():
            assert bool((w[~e.state.masks[n]] == 0).all())
        else:  # a layer the allocation keeps dense gets no mask
            assert n not in e.state.masks


def test_engine_batches_cover_the_data():
    e = make_engine(CompressConfig(batch_size=4, min_batches=1), ids_as_labels=True)
    got = list(e.batches(1.0))
    assert len(got) == 4 and all(b[3] == 4 for b in got)
    ids = torch.cat([b[1] for b in got]).tolist()
    assert sorted(ids) == list(range(16))  # one epoch: every sample exactly once
    assert n_batches(0.5, batch_size=4, min_batches=1) == 2
    assert n_batches(2.0, batch_size=4, min_batches=1) == 8
    assert n_batches(batch_size=4, min_batches=1, max_batches_per_epoch=3) == 3
    # the floor for small data sets: at least min_batches optimizer steps per unit
    assert n_batches(batch_size=4, min_batches=10) == 10


def test_engine_max_batches_caps_the_default_floor():
    assert n_batches(batch_size=4, max_batches_per_epoch=2) == 2


def test_engine_training_emits_no_torch_warning():
    """No 'Converting a tensor with requires_grad=True to a scalar' noise on the CLI's stderr."""
    e = make_engine(CompressConfig(batch_size=8, min_batches=1, max_batches_per_epoch=1))
    e.start_admm(0)
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns only once per process otherwise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e.train_epoch(Unit("admm", 0, 0), e.make_optimizer(1e-3), "t")
    finally:
        torch.set_warn_always(was)
    assert not [w for w in caught if "requires_grad" in str(w.message)]


# ---- the CLI ---------------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def fast_toml(work) -> Path:
    p = work / "fast.toml"
    p.write_text("min_batches = 1\n")
    return p


@pytest.fixture(scope="module")
def cli_run(work, fast_toml):
    """compress through the CLI with --seed 1 and the report as JSON."""
    out = work / "cli.onnx"
    args = ["compress", MODEL, out, "--data", "digits", "--rate", "20x", "--seed", "1", "--config", fast_toml]
    args += ["--final-retrain-epochs", "2", "--final-retrain-lr", "0.004", "--lr-relative", "0.02"]
    args += ["--freeze-oscillations", "0.03"]
    r = invoke(*args, *CLI_FAST, "--json")
    return {"result": r, "out": out, "args": args}


def test_cli_compress(cli_run, baseline):
    r, out = cli_run["result"], cli_run["out"]
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    check_report(rep)
    check_output_matches_report(out, rep)
    assert rep["config"]["seed"] == 1 and rep["config"]["min_batches"] == 1
    assert rep["config"]["max_batches_per_epoch"] == 2 and rep["config"]["admm_iterations"] == 2
    assert rep["config"]["final_retrain_epochs"] == 2 and rep["config"]["final_retrain_lr"] == 0.004
    assert rep["config"]["lr_relative"] == 0.02 and rep["config"]["freeze_oscillations"] == 0.03
    retrain = [h["step"] for h in rep["history"] if h["kind"] == "retrain"]
    assert retrain == [0, 1, 1]  # one epoch in the first of the two steps, two in the last
    report = out.with_name("cli.report.json")
    assert json.loads(report.read_text())["pruning_rate"] == rep["pruning_rate"]
    assert not same_weights(out, baseline["out"])  # seed 1 differs from seed 0


def test_cli_compress_text_summary_and_seed(cli_run, tmp_path):
    out = tmp_path / "again.onnx"
    args = [a if a != cli_run["out"] else out for a in cli_run["args"]]
    r = invoke(*args, *CLI_FAST, "--quiet")
    assert r.exit_code == 0, r.output
    assert "fc1.weight" in r.stdout and "total" in r.stdout and "accuracy" in r.stdout
    assert out.read_bytes() == cli_run["out"].read_bytes()  # same seed: identical file


def test_cli_evaluate_compressed(cli_run, baseline):
    for out in (cli_run["out"], baseline["out"]):
        r = invoke(
            "evaluate",
            out,
            "--data",
            "digits",
            "--reference",
            MODEL,
            "--providers",
            "cpu",
            "--batch-sizes",
            "1",
            "--runs",
            "2",
            "--json",
        )
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["samples"] == 1797 and 0 <= d["accuracy"] <= 1 and 0 <= d["agreement"] <= 1
        assert d["reference"]["accuracy"] > 0.9
        assert d["file_bytes"] == out.stat().st_size


@pytest.mark.parametrize("rate", ["0.5x", "0x", "-3", "abc", "100%", "0.99"])
def test_cli_bad_rates(tmp_path, rate):
    out = tmp_path / "o.onnx"
    line = one_line_error(invoke("compress", MODEL, out, "--data", "digits", "--rate", rate))
    assert "rate" in line and rate in line
    assert not out.exists()


def test_cli_output_equal_input_needs_force(model_copy, fast_toml):
    before = sha(model_copy)
    line = one_line_error(invoke("compress", model_copy, model_copy, "--data", "digits"))
    assert "--force" in line
    assert sha(model_copy) == before
    r = invoke(
        "compress",
        model_copy,
        model_copy,
        "--data",
        "digits",
        "--config",
        fast_toml,
        *CLI_FAST,
        "--force",
        "--no-shrink",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert sha(model_copy) != before
    assert int(sum(np.count_nonzero(onnx_weights(model_copy)[n]) for n in WEIGHTS)) == sum(
        allocate(SIZES, 20.0).values()
    )


def test_cli_config_errors_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_knob = 3\n")
    line = one_line_error(invoke("compress", MODEL, tmp_path / "o.onnx", "--data", "digits", "--config", bad))
    assert "no_such_knob" in line
    bad.write_text('[layers."nope.weight"]\nrate = 4\n')
    line = one_line_error(invoke("compress", MODEL, tmp_path / "o.onnx", "--data", "digits", "--config", bad))
    assert "nope.weight" in line
    line = one_line_error(
        invoke(
            "compress", MODEL, tmp_path / "o.onnx", "--data", "digits", "--config", tmp_path / "missing.toml"
        )
    )
    assert "missing.toml" in line


CONFIGS = {
    "toml": FAST_TOML
    + 'rate = "20x"\nseed = 0\n[layers."conv2.weight"]\nrate = "10x"\n[layers."fc2.weight"]\nexclude = true\n',
    "json": json.dumps(
        {
            "compress": {
                **FAST,
                "rate": 20,
                "seed": 0,
                "layer_rates": {"conv2.weight": "10x"},
                "exclude": ["fc2.*"],
            }
        }
    ),
}


@pytest.mark.parametrize("kind", ["toml", "json"])
def test_cli_config_file_layer_rate_and_exclude(tmp_path, kind):
    cfg = tmp_path / f"c.{kind}"
    cfg.write_text(CONFIGS[kind])
    out = tmp_path / "c.onnx"
    before = onnx_weights(MODEL)["fc2.weight"]
    r = invoke("compress", MODEL, out, "--data", "digits", "--config", cfg, "--format", "auto", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    check_report(rep)
    check_output_matches_report(out, rep)
    layers = {x["name"]: x for x in rep["layers"]}
    conv2 = layers["conv2.weight"]  # the fixed per-layer rate (in training: dead filters are cut after)
    assert conv2.get("nonzero_trained", conv2["nonzero"]) == round(4608 / 10) >= conv2["nonzero"]
    fc2 = layers["fc2.weight"]
    assert fc2.get("nonzero_trained", fc2["nonzero"]) == fc2["params"] == 640  # excluded: not pruned
    assert "fc2.weight" not in sparse_names(out) and "fc2.weight" not in rep["format"]["sparse_tensors"]
    # shrink may drop its inputs from fc1 units that pruning left without weights (their constant
    # output went into fc2's bias); what it keeps stays dense
    after = onnx_weights(out)["fc2.weight"]
    assert list(after.shape) == fc2.get("shape_after", list(before.shape)) and after.shape[0] == 10
    assert fc2["nonzero"] == after.size
    assert rep["config"]["exclude"] == (["fc2.weight"] if kind == "toml" else ["fc2.*"])


def test_cli_exclude_option(tmp_path, fast_toml):
    out = tmp_path / "e.onnx"
    r = invoke(
        "compress",
        MODEL,
        out,
        "--data",
        "digits",
        "--config",
        fast_toml,
        *CLI_FAST,
        "--rate",
        "10x",
        "--exclude",
        "conv1.weight",
        "--one-shot",
        "--format",
        "dense",
        "--json",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    check_report(rep, target=10.0)
    assert rep["layers"][0]["nonzero"] == 144 and rep["steps"] == [10.0]
    assert sparse_names(out) == set()


def test_cli_interrupt_and_resume(cli_run, tmp_path, monkeypatch):
    out = tmp_path / "cli.onnx"
    args = [a if a != cli_run["out"] else out for a in cli_run["args"]]
    restore = interrupt_training_at(monkeypatch, 4)
    r = invoke(*args, *CLI_FAST, "--quiet")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert Path(f"{out}.ckpt").is_file() and not out.exists()
    restore()
    r = invoke(*args, *CLI_FAST, "--quiet", "--resume")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == cli_run["out"].read_bytes()
    assert not Path(f"{out}.ckpt").exists()


def test_quantizing_a_sparse_input_keeps_its_zeros(baseline, tmp_path):
    """Binarizing an already pruned model: zeros stay exact zeros (not +-q), the rest take two values
    per layer, and no pruning step runs."""
    rep = compress(baseline["out"], tmp_path / "bin.onnx", "digits", bits=1, quiet=True, **FAST)
    from test_compress_quant import (
        onnx_weights as decoded_weights,  # codebook weights, decoded by onnxruntime
    )

    assert rep["steps"] == [1.0]  # the quantization step alone (at the input's own sparsity)
    assert len(rep["history"]) == FAST["admm_iterations"] + FAST["retrain_epochs"]  # one (quantization) step
    before, after = onnx_weights(baseline["out"]), decoded_weights(tmp_path / "bin.onnx")
    for n in SIZES:
        assert np.array_equal(before[n] == 0, after[n] == 0), n
        values = np.unique(np.abs(after[n][after[n] != 0]))
        assert len(values) == 1, (n, values[:5])

def test_auto_distillation_needs_a_small_teacher_cache(tmp_path, monkeypatch):
    """With labels, distillation from the original is on by default (weight 1) unless caching the
    original's outputs would take more than TEACHER_CACHE_LIMIT; an explicit weight always wins."""
    import onnxadmm.compress.pipeline as pipeline

    monkeypatch.setattr(pipeline, "TEACHER_CACHE_LIMIT", 1000)
    logs: list[str] = []
    rep = compress(MODEL, tmp_path / "a.onnx", "digits", rate=4, log=logs.append, quiet=True, **FAST)
    assert rep["config"]["distill"] == 0.0
    assert any("too large to cache" in line for line in logs), logs
    rep = compress(MODEL, tmp_path / "b.onnx", "digits", rate=4, distill=0.5, quiet=True, **FAST)
    assert rep["config"]["distill"] == 0.5


@pytest.mark.parametrize("value", [0, 2.5, float("inf"), float("nan"), True, "3"])
def test_whole_number_settings_reject_other_values(value):
    with pytest.raises(ConfigError, match="whole number"):
        CompressConfig(admm_iterations=value).validate()


def test_whole_number_settings_accept_integral_floats():
    cfg = CompressConfig(admm_iterations=6.0, batch_size=64.0).validate()  # e.g. from a JSON config
    assert (cfg.admm_iterations, cfg.batch_size) == (6, 64)
    assert isinstance(cfg.admm_iterations, int)


def test_codebook_format_needs_something_to_pack(tmp_path):
    with pytest.raises(ConfigError, match="quantized or pruned"):
        compress(MODEL, tmp_path / "o.onnx", "digits", rate=1, fmt="codebook", quiet=True, **FAST)
    assert not (tmp_path / "o.onnx").exists()


def test_compressing_a_packed_model_again(baseline, tmp_path):
    """The baseline's pruned layers are in packed form (decoder nodes): compressing it again sees
    plain weights, keeps their zeros and packs the new ones."""
    from onnxadmm.export.storage import decoder_nodes

    assert baseline["rep"]["format"]["codebook_tensors"]
    out = tmp_path / "again.onnx"
    rep = compress(baseline["out"], out, "digits", rate=30, quiet=True, shrink=False, **FAST)
    before, after = onnx_weights(baseline["out"]), onnx_weights(out)
    for n in SIZES:
        assert not np.any((before[n] == 0) & (after[n] != 0)), n
    assert rep["pruning_rate"] == pytest.approx(30.0, rel=0.02)
    decoders = decoder_nodes(onnx.load(str(out)))
    assert all(decoders.values()) and len(decoders) == len(rep["format"]["codebook_tensors"])
    check_output_matches_report(out, rep)


def test_packed_model_imports_inspects_and_verifies(baseline):
    """A model with packed (decoder-node) weights imports with those weights as parameters, and
    inspect / verify see every layer."""
    from onnxadmm.importer.graph import OnnxGraphModule
    from onnxadmm.validate.inspect import describe
    from onnxadmm.validate.verify import verify_model

    out = baseline["out"]
    assert baseline["rep"]["format"]["codebook_tensors"]
    module = OnnxGraphModule(out)
    params = dict(module.named_onnx_parameters())
    weights = onnx_weights(out)
    for n in SIZES:
        assert np.array_equal(params[n].detach().numpy(), weights[n]), n
    d = describe(out)
    assert [x["name"] for x in d["layers"]] == WEIGHTS
    assert d["packed_weights"] == sorted(baseline["rep"]["format"]["codebook_tensors"])
    assert "ScatterElements" not in d["ops"] and not d["unsupported"]
    assert verify_model(out).ok


def _converted(tmp_path, name, opset=None, float16=False) -> Path:
    """The demo model at another opset and/or with float16 weights and inputs."""
    m = onnx.load(str(MODEL))
    if opset is not None:  # Conv, Relu, MaxPool, Reshape, Gemm: the same behaviour at opset 9
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = opset
        m.ir_version = onnx.helper.find_min_ir_version_for(list(m.opset_import))
    if float16:
        for t in m.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
        for v in list(m.graph.input) + list(m.graph.output):
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    path = tmp_path / name
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("kw", [{"rate": 20}, {"rate": 8, "bits": 4}], ids=["prune", "prune+4bits"])
def test_float16_model_in_packed_form(tmp_path, kw):
    """A float16 model: the packed weights are float16 like the original's and decode exactly."""
    src = _converted(tmp_path, "f16.onnx", float16=True)
    out = tmp_path / "f16c.onnx"
    rep = compress(src, out, "digits", quiet=True, **FAST, **kw)
    assert rep["format"]["codebook_tensors"]
    w = onnx_weights(out)
    for x in rep["layers"]:
        assert w[x["name"]].dtype == np.float16 and int(np.count_nonzero(w[x["name"]])) == x["nonzero"]
    # training runs in float32 either way: the float16 model ends where the float32 one does
    ref = compress(MODEL, tmp_path / "f32c.onnx", "digits", quiet=True, **FAST, **kw)
    assert rep["accuracy"]["compressed"] == pytest.approx(ref["accuracy"]["compressed"], abs=0.05)


def test_old_opset_model_is_raised_when_that_changes_nothing(tmp_path):
    """The demo model at opset 9: raising it to 11 for the sparse decoders keeps its outputs, so
    auto packs the pruned layers and the file runs at opset 11."""
    src = _converted(tmp_path, "op9.onnx", opset=9)
    out = tmp_path / "op9c.onnx"
    rep = compress(src, out, "digits", rate=20, quiet=True, **FAST)
    m = onnx.load(str(out))
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [11]
    assert "fc1.weight" in rep["format"]["codebook_tensors"]
    check_output_matches_report(out, rep)


def test_no_packed_sparse_form_where_raising_the_opset_changes_outputs():
    """onnx.version_converter turns Upsample(linear) at opset 9 into a Resize-11 with another
    coordinate mode: auto then keeps the opset and leaves pruned layers to COO or dense."""
    from onnx import TensorProto, helper

    from onnxadmm.compress.pipeline import _compact_sparse, _sparse_decoders_ok

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 1, 5, 5)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0

    def model(upsample: bool):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"])]
        if upsample:
            nodes.append(helper.make_node("Upsample", ["r", "s"], ["y"], mode="linear"))
        else:
            nodes.append(helper.make_node("Identity", ["r"], ["y"]))
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")]
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)

    assert _sparse_decoders_ok(model(False))
    assert not _sparse_decoders_ok(model(True))
    assert _compact_sparse("auto", {"w": w}, model(True)) == {}
    assert set(_compact_sparse("auto", {"w": w}, model(False))) == {"w"}
    assert set(_compact_sparse("codebook", {"w": w}, model(True))) == {"w"}  # asked for explicitly


def test_auto_file_is_no_larger_than_dense_or_coo(baseline, tmp_path):
    """The real files: auto's choice per layer gives a file no larger than all-dense or all-COO."""
    sizes = {}
    for fmt in ("dense", "sparse"):
        out = tmp_path / f"{fmt}.onnx"
        compress(MODEL, out, "digits", rate=20, seed=0, fmt=fmt, quiet=True, **FAST)
        sizes[fmt] = out.stat().st_size
    auto = baseline["out"].stat().st_size
    assert auto < sizes["sparse"] < sizes["dense"], (auto, sizes)


def test_coo_input_is_repacked(tmp_path):
    """Weights that arrive as ONNX sparse initializers can be written in packed form too."""
    coo = tmp_path / "coo.onnx"
    compress(MODEL, coo, "digits", rate=20, fmt="sparse", quiet=True, **FAST)
    assert sparse_names(coo)
    out = tmp_path / "again.onnx"
    rep = compress(coo, out, "digits", rate=30, quiet=True, **FAST)
    assert set(rep["format"]["codebook_tensors"]) >= {"fc1.weight"}
    assert not sparse_names(out) & set(rep["format"]["codebook_tensors"])
    check_output_matches_report(out, rep)


def test_final_step_retraining_epochs():
    from onnxadmm.compress.admm import plan

    cfg = CompressConfig(admm_iterations=2, retrain_epochs=1, final_retrain_epochs=3).validate()
    units = plan(cfg, 3)
    per_step = [sum(u.kind == "retrain" and u.step == s for u in units) for s in range(3)]
    assert per_step == [1, 1, 3]
    assert cfg.retrain_epochs_of(2, 2) == 3 and cfg.retrain_epochs_of(1, 2) == 1
    assert CompressConfig(retrain_epochs=2).validate().retrain_epochs_of(0, 1) == 2  # None: as the others
    with pytest.raises(ConfigError, match="final_retrain_epochs"):
        CompressConfig(final_retrain_epochs=-1).validate()


def test_final_step_retraining_lr(monkeypatch, tmp_path):
    """final_retrain_lr sets the last step's retraining lr (its cosine starts there); the other
    steps and the ADMM W-steps keep theirs."""
    cfg = CompressConfig(retrain_lr=1e-3, final_retrain_lr=2e-2).validate()
    assert cfg.retrain_lr_of(2, 2) == 2e-2 and cfg.retrain_lr_of(1, 2) == 1e-3
    assert CompressConfig(retrain_lr=5e-4).validate().retrain_lr_of(0, 1) == 5e-4  # None: as the others
    with pytest.raises(ConfigError, match="final_retrain_lr"):
        CompressConfig(final_retrain_lr=0).validate()
    seen = []  # (kind, step, lr at each retraining/ADMM optimizer step)
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    fast = dict(FAST, max_batches_per_epoch=4)
    rep = compress(
        MODEL, tmp_path / "lr.onnx", "digits", rate=40, quiet=True, final_retrain_lr=2e-2, **fast
    )
    kinds = [(h["kind"], h["step"]) for h in rep["history"]]
    assert kinds == [("admm", 0)] * 2 + [("retrain", 0)] + [("admm", 1)] * 2 + [("retrain", 1)]
    per_unit = [seen[i * 4 : i * 4 + 4] for i in range(len(kinds))]
    assert per_unit[2][0] == pytest.approx(1e-3) and per_unit[5][0] == pytest.approx(2e-2)
    assert all(lr == pytest.approx(1e-3) for u in (0, 1, 3, 4) for lr in per_unit[u])  # W-steps
    assert per_unit[5][-1] < per_unit[5][0]  # cosine decay from the restart


def test_packed_storage_failure_falls_back_under_auto(tmp_path, monkeypatch):
    """If writing the packed form fails, auto writes plain / COO tensors (and says so); an explicit
    --format codebook fails with the error and leaves no output file."""
    from onnxadmm.errors import OnnxAdmmError
    from onnxadmm.export import storage

    def broken(*a, **k):
        raise OnnxAdmmError("simulated converter failure")

    monkeypatch.setattr(storage, "apply_storage", broken)
    logs: list[str] = []
    out = tmp_path / "auto.onnx"
    with pytest.warns(RuntimeWarning, match="packed storage not possible"):  # quiet: still warned
        rep = compress(MODEL, out, "digits", rate=20, log=logs.append, quiet=True, **FAST)
    assert any("packed storage not possible" in line for line in logs)
    assert "warning: packed storage was not possible" in format_report(rep)
    assert rep["format"]["codebook_tensors"] == [] and rep["format"]["sparse_tensors"]
    assert rep["format"]["packed_error"] == "simulated converter failure"
    check_output_matches_report(out, rep)
    cb = tmp_path / "cb.onnx"
    scratch = tmp_path / "scratch"  # compress's work folder goes there: it must be gone after the error
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(OnnxAdmmError, match="simulated"):
        compress(MODEL, cb, "digits", rate=20, fmt="codebook", quiet=True, **FAST)
    assert not cb.exists()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("sigmoid", [True, False])
def test_binary_classifier_end_to_end(tmp_path, digits, sigmoid):
    """A one-column classifier ('is it a 0?'), ending in Sigmoid or in its logit: trained on the
    logit with binary labels, and validated in onnxruntime with accuracy for both models."""
    from conftest import binary_digits_model

    from onnxadmm.validate.evaluate import evaluate_model

    src = binary_digits_model(tmp_path / "bin.onnx", sigmoid=sigmoid)
    train, val = Dataset({"input": digits[0]}, digits[1]).split(0.25, seed=0)
    zero = lambda ds: Dataset(dict(ds.inputs), (ds.labels == 0).astype(np.int64))  # noqa: E731
    out = tmp_path / "bin_c.onnx"
    rep = compress(src, out, zero(train), val_data=zero(val), rate=5, quiet=True, **FAST)
    acc = rep["accuracy"]
    assert acc["original"] is not None and acc["compressed"] is not None
    direct = evaluate_model(out, zero(val), reference=src, providers=())
    assert acc["compressed"] == pytest.approx(direct["accuracy"])
    assert acc["original"] == pytest.approx(direct["reference"]["accuracy"])
    assert rep["agreement"] == pytest.approx(direct["agreement"])
    assert acc["original"] > 0.95  # the rule decides as the CNN does (a wrong cut-off gives ~0.1)
    torch_acc = [h["val_accuracy"] for h in rep["history"] if h.get("val_accuracy") is not None]
    assert torch_acc and max(torch_acc) > 0.9  # torch-side validation sees the binary classes too


def test_one_column_regression_with_targets(tmp_path, digits):
    """A one-column output with labels other than 0/1 is a regression output: MSE on the targets
    (the loss is not zero), no accuracy; targets of the wrong size are a clear error."""
    from conftest import binary_digits_model

    src = binary_digits_model(tmp_path / "reg.onnx", sigmoid=False)
    x = digits[0]
    targets = digits[1].astype(np.float32)[:, None] * 0.5 + 3.0  # far from the margin it outputs
    rep = compress(src, tmp_path / "reg_c.onnx", {"input": x, "y": targets}, rate=5, quiet=True, **FAST)
    assert rep["accuracy"] == {"original": None, "compressed": None} and rep["agreement"] is None
    # scored as a regression in onnxruntime: the fit to the targets, and to the original's outputs
    sess = ort.InferenceSession(str(tmp_path / "reg_c.onnx"), providers=["CPUExecutionProvider"])
    val_idx = Dataset({"input": x}, targets).split(0.1, 0)[1]  # compress's default held-out split
    (pred,) = sess.run(None, dict(val_idx.inputs))
    want = float(np.sqrt(np.mean((pred.astype(np.float64) - val_idx.labels) ** 2)))
    assert rep["regression"]["compressed"]["rmse"] == pytest.approx(want, rel=1e-5)
    assert rep["regression"]["original"]["r2"] <= 1.0 and set(rep["fit_to_original"]) == {"margin"}
    text = format_report(rep)
    assert "regression (onnxruntime" in text and "R^2 against the original's outputs" in text
    losses = [h["loss"] for h in rep["history"]]
    assert all(np.isfinite(losses)) and min(losses) > 0.01
    with pytest.raises(DataError, match="regression output"):
        compress(src, tmp_path / "bad.onnx", {"input": x, "y": np.c_[targets, targets]}, rate=5, quiet=True, **FAST)



def test_high_rate_restart_rule():
    """Auto (None): from restart_rate up, the final step retrains at 10x the lr for 2x the epochs;
    explicit values win; nothing pruned, no restart."""
    low = CompressConfig(rate=50, retrain_lr=1e-3, retrain_epochs=4).validate()
    assert (low.final_lr(), low.final_epochs()) == (1e-3, 4)
    high = CompressConfig(rate=100, retrain_lr=1e-3, retrain_epochs=4).validate()
    assert high.final_lr() == pytest.approx(1e-2) and high.final_epochs() == 8
    assert (high.final_lr(prunes=False), high.final_epochs(prunes=False)) == (1e-3, 4)
    assert high.retrain_lr_of(0, 2) == 1e-3 and high.retrain_epochs_of(0, 2) == 4
    mine = CompressConfig(rate=300, final_retrain_lr=3e-3, final_retrain_epochs=5).validate()
    assert (mine.final_lr(), mine.final_epochs()) == (3e-3, 5)
    assert not CompressConfig(rate=300, restart_rate=500).validate().restarts()
    # filter pruning restarts at any rate; channel pruning as unstructured
    assert CompressConfig(rate=4, structure="filter").validate().final_epochs() == 8
    assert not CompressConfig(rate=4, structure="channel").validate().restarts()
    with pytest.raises(ConfigError, match="restart_rate"):
        CompressConfig(restart_rate=0.5).validate()


def test_long_admm_iterations_rule():
    """Auto (None): one epoch per ADMM iteration, two when pruning alone (unstructured, no
    quantization) to long_admm_rate or more; an explicit value wins."""
    assert CompressConfig(rate=100).validate().iteration_epochs() == 1
    assert CompressConfig(rate=200).validate().iteration_epochs() == 2
    assert CompressConfig(rate=246, bits=3).validate().iteration_epochs() == 1
    assert CompressConfig(rate=300, structure="filter").validate().iteration_epochs() == 1
    assert CompressConfig(rate=300, long_admm_rate=500).validate().iteration_epochs() == 1
    assert CompressConfig(rate=300, epochs_per_iteration=0.5).validate().iteration_epochs() == 0.5
    with pytest.raises(ConfigError, match="long_admm_rate"):
        CompressConfig(long_admm_rate=0).validate()


def test_long_admm_iterations_in_a_run(tmp_path):
    """A run at 200x trains two epochs' worth of batches per ADMM iteration and reports the value."""
    cfg = dict(FAST, max_batches_per_epoch=3, admm_iterations=1, progressive=False)
    runs = {r: compress(MODEL, tmp_path / f"{r}.onnx", "digits", rate=r, quiet=True, **cfg) for r in (100, 200)}
    assert [runs[r]["config"]["epochs_per_iteration"] for r in (100, 200)] == [1, 2]
    # the same schedule otherwise (both restart the final retraining): 3 more batches, 6 against 3
    assert runs[200]["optimizer_steps"] - runs[100]["optimizer_steps"] == 3


def test_high_rate_restart_in_the_last_pruning_step(tmp_path, monkeypatch):
    """--rate 100x --bits 4: the restart belongs to the step that reaches 100x, not to the
    quantization step after it; the report shows the resolved values."""
    from onnxadmm.compress.admm import final_step_of

    assert final_step_of([None, None, {"w": 1}]) == 1 and final_step_of([{"w": 1}]) == 0
    assert final_step_of([None, None]) == 1
    starts = []  # the lr each retraining phase's optimizer is made with
    real = Engine.make_optimizer
    monkeypatch.setattr(Engine, "make_optimizer", lambda self, lr: starts.append(lr) or real(self, lr))
    rep = compress(MODEL, tmp_path / "r.onnx", "digits", rate=100, bits=4, quiet=True, **FAST)
    retrain_lr = [lr for lr in starts if lr != rep["config"]["lr"]]
    assert retrain_lr == [pytest.approx(1e-2)]  # the 100x step only; the others start at lr = 1e-3
    assert rep["config"]["final_retrain_lr"] == pytest.approx(10 * rep["config"]["retrain_lr"])
    assert rep["config"]["final_retrain_epochs"] == 2
    retrain = [h["step"] for h in rep["history"] if h["kind"] == "retrain"]
    n_prune = len(rep["steps"]) - 1
    assert retrain == list(range(n_prune - 1)) + [n_prune - 1] * 2 + [n_prune]


def _matmul_model(w: np.ndarray, opset: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    t = TensorProto.FLOAT16 if w.dtype == np.float16 else TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", t, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", t, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    m = onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def test_storage_choice_prices_float16_weights_at_two_bytes():
    """The training state is float32, but a float16 model's file keeps 2-byte weights: a packed form
    larger than the float16 tensor is not kept, and COO (2 + 8 bytes a non-zero) is not chosen at a
    density where dense float16 is smaller."""
    from types import SimpleNamespace

    from onnxadmm.compress import pipeline as pl

    rng = np.random.default_rng(0)
    levels = np.linspace(-1, 1, 200).astype(np.float16)
    w16 = levels[rng.integers(0, 200, (20, 30))]  # ~200 levels: 8-bit codes + a 200-entry codebook
    proto = _matmul_model(w16, 13)
    state = {"w": w16.astype(np.float32)}
    grid = SimpleNamespace(codebook=torch.tensor(np.unique(w16).astype(np.float32))[None], group_axis=None)
    encodings = pl._encodings("auto", {"w": grid}, state, proto, sparse_ok=True)
    assert encodings  # a packed form exists, but takes more room than 1,200 bytes of float16
    kept, _ = pl._select_storage("auto", encodings, state, proto)
    assert kept == {}
    quarter = w16.copy()
    quarter[rng.random(quarter.shape) > 0.25] = 0  # 25% dense: COO 10 B a non-zero > 2 B a weight
    assert pl._pick_format("auto", {"w": quarter.astype(np.float32)}, proto) == set()
    assert pl._pick_format("auto", {"w": quarter.astype(np.float32)}, _matmul_model(quarter.astype(np.float32), 13)) == {"w"}


def test_dense_encoding_priced_against_coo():
    """Without sparse decoders (opset 9 that cannot be raised), a pruned, quantized weight gets a
    dense codebook encoding; it is kept only if smaller than the COO tensor the weight would get."""
    from types import SimpleNamespace

    from onnxadmm.compress import pipeline as pl

    rng = np.random.default_rng(0)
    levels = np.linspace(-1, 1, 7).astype(np.float32)
    w = levels[rng.integers(0, 7, (200, 300))]
    w[rng.random(w.shape) > 0.01] = 0  # 1% dense: COO ~7 KB, dense 3-bit codes ~22 KB
    proto = _matmul_model(w, 9)
    state = {"w": w}
    grid = SimpleNamespace(codebook=torch.tensor(np.append(levels, 0))[None], group_axis=None)
    encodings = pl._encodings("auto", {"w": grid}, state, proto, sparse_ok=False)
    assert not encodings["w"].sparse
    assert pl._select_storage("auto", encodings, state, proto, coo={"w"})[0] == {}
    assert pl._select_storage("auto", encodings, state, proto)[0] == {}  # coo worked out by default
    assert pl._select_storage("auto", encodings, state, proto, coo=set())[0] == encodings  # vs 240 KB dense


def _embedding_model(path: Path, vocab: int = 20) -> Path:
    """ids (int64, N x 5) -> Gather from a (vocab, 8) table -> mean over tokens -> Gemm (8 -> 3)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, 8)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["emb", "ids64"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["m", "w", "b"], ["y"], transB=1),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("bad", [20, -21])
def test_token_ids_out_of_the_table_are_a_data_error(tmp_path, bad):
    """Token ids past the embedding table: a DataError naming the input and the valid range (the
    CLI's one-line error), not torch's bare IndexError; ids within it (negative ones count from the
    end, as ONNX Gather allows) train."""
    model = _embedding_model(tmp_path / "emb.onnx")
    ids = np.random.default_rng(1).integers(-20, 20, size=(64, 5)).astype(np.int32)
    ok = compress(model, tmp_path / "ok.onnx", {"ids": ids}, rate=2, quiet=True, **FAST)
    assert ok["pruning_rate"] >= 2.0
    ids[3, 2] = bad
    with pytest.raises(DataError, match=rf"input 'ids': value {bad} is out of range for 'emb', which has 20 entries"):
        compress(model, tmp_path / "bad.onnx", {"ids": ids}, rate=2, quiet=True, **FAST)
    np.savez(tmp_path / "bad.npz", ids=ids)
    res = CliRunner().invoke(cli, ["compress", str(model), str(tmp_path / "c.onnx"), "--data", str(tmp_path / "bad.npz"), "--rate", "2x", "--quiet"])
    assert res.exit_code != 0 and "out of range for 'emb'" in res.output and "Traceback" not in res.output


def test_embedding_tables_are_compressed(tmp_path):
    """A Gather of a 2-D float table by token ids (a model input, here through Cast) is a weight:
    pruned and quantized weight by weight, stored packed, listed by report and inspect; Gathers
    of constants by constant or computed indices are not weights."""
    from onnx import helper

    from onnxadmm.importer.analysis import find_weights
    from onnxadmm.validate.inspect import describe
    from onnxadmm.validate.storage_report import storage_report

    model = _embedding_model(tmp_path / "emb.onnx", vocab=200)
    ws = {w.name: w for w in find_weights(load_model(model))}
    assert ws["emb"].compressible and ws["emb"].op_type == "Gather" and ws["emb"].out_axis is None
    ids = np.random.default_rng(2).integers(0, 200, size=(256, 5)).astype(np.int32)
    out = tmp_path / "p.onnx"
    rep = compress(model, out, {"ids": ids}, rate=4, bits=4, quiet=True, **FAST)
    layers = {x["name"]: x for x in rep["layers"]}
    assert layers["emb"]["op"] == "Gather" and layers["emb"]["rate"] > 3
    check_output_matches_report(out, rep)
    emb = onnx_weights(out)["emb"]
    assert len(np.unique(emb[emb != 0])) <= 16  # 4 bits, the zeros by position
    assert "emb" in rep["format"]["codebook_tensors"]
    st = storage_report(out, reference=model)
    assert [x["name"] for x in st["layers"]] == ["emb", "w"]
    assert st["layers"][0]["nonzero"] == layers["emb"]["nonzero"]
    assert next(x for x in describe(model)["layers"] if x["name"] == "emb")["channels_kept_by"].startswith(
        "an embedding table"
    )
    # constant lookups: a table read at constant indices, or at indices computed by Range
    m = load_model(model)
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 2], np.int64), "const_idx"))
    m.graph.node.extend(
        [
            helper.make_node("Gather", ["emb", "const_idx"], ["picked"]),
            helper.make_node("Range", ["zero", "two", "one"], ["r"]),
            helper.make_node("Gather", ["emb2", "r"], ["picked2"]),
        ]
    )
    m.graph.initializer.extend(
        [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", 0), ("two", 2), ("one", 1))]
        + [numpy_helper.from_array(np.ones((4, 8), np.float32), "emb2")]
    )
    ws = {w.name: w for w in find_weights(m)}
    assert "emb2" not in ws and ws["emb"].compressible  # (emb: still the table of the token lookup)


def test_adam_step_floor_relative_to_each_tensors_rms():
    """lr_relative: Adam's first step moves every value by its group's lr (|g| >> eps), which is
    max(lr, lr_relative * the tensor's rms in the input model), weights and biases alike; 0 turns it
    off; the cosine schedule keeps the ratio."""
    lr = 1e-3
    e = make_engine(CompressConfig(batch_size=8, min_batches=1, max_batches_per_epoch=1))
    params = dict(e.m.named_onnx_parameters())
    rms = {n: float(p.detach().double().pow(2).mean().sqrt()) for n, p in params.items()}
    scaled = {n for n in params if 0.01 * rms[n] > lr}
    # the test needs weights and biases on both sides of the floor
    assert scaled & set(e.names) and set(e.names) - scaled and scaled - set(e.names), rms
    opt = e.make_optimizer(lr)
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["lr_scale"] == 1.0
    assert len(opt.param_groups) == 1 + len(scaled)
    before = {n: p.detach().clone() for n, p in params.items()}
    xs, y, t, _ = next(e.batches(1.0))
    opt.zero_grad()
    logits = e._outs(xs)[0].float()
    (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    opt.step()
    for n, p in params.items():
        big = grads[n].abs() > 1e-4  # eps 1e-8 shrinks the step of a tiny gradient
        step = (p.detach() - before[n]).abs()[big]
        want = 0.01 * rms[n] if n in scaled else lr
        assert step.numel() and torch.allclose(step, torch.full_like(step, want), rtol=1e-3), n
    # off: one group, every step lr
    e0 = make_engine(CompressConfig(lr_relative=0))
    assert len(e0.make_optimizer(lr).param_groups) == 1
    # the cosine retraining schedule multiplies each group's lr by its scale
    e = make_engine(CompressConfig(batch_size=4, min_batches=1, max_batches_per_epoch=4))
    e.hard_prune(0)
    opt = e.make_optimizer(lr)
    e.train_epoch(Unit("retrain", 0, 0), opt, "t")
    assert opt.param_groups[0]["lr"] < lr  # the schedule moved
    for g in opt.param_groups[1:]:
        assert g["lr"] == pytest.approx(opt.param_groups[0]["lr"] * g["lr_scale"], rel=1e-9)
    with pytest.raises(ConfigError, match="lr_relative"):
        CompressConfig(lr_relative=-0.1).validate()
