"""ADMM quantization, binarization and clustering through ``compress`` on models/digits_cnn.onnx.

Tiny runs (2 ADMM iterations, 1 retraining epoch, 2 batches per unit): they check that the written
weights lie on the value sets asked for, that pruning and quantization combine, that onnxruntime agrees
with the report, and the configuration errors; accuracy is the benchmarks' business.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from onnxadmm.compress.admm import Engine, QuantSpec, Unit
from onnxadmm.compress.config import CompressConfig
from onnxadmm.compress.objective import training_heads
from onnxadmm.compress.pipeline import compress
from onnxadmm.data import Dataset, input_specs_of, load_data
from onnxadmm.errors import ConfigError
from onnxadmm.importer.graph import OnnxGraphModule
from onnxadmm.modelio import load_model

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models train on one thread
WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
SIZES = {"conv1.weight": 144, "conv2.weight": 4608, "fc1.weight": 32768, "fc2.weight": 640}
FAST = {"admm_iterations": 2, "retrain_epochs": 1, "min_batches": 1, "max_batches_per_epoch": 2, "batch_size": 64}


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The weights of the written model, whatever their storage: plain and sparse initializers are
    read; weights decoded from codes at load are made graph outputs and computed by onnxruntime."""
    m = onnx.load(str(path))
    out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in WEIGHTS}
    for sp in m.graph.sparse_initializer:
        dense = np.zeros(tuple(sp.dims), np.float32)
        dense.flat[numpy_helper.to_array(sp.indices).ravel()] = numpy_helper.to_array(sp.values)
        out[sp.values.name] = dense
    rest = [n for n in WEIGHTS if n not in out]
    if rest:
        for n in rest:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.zeros((1, 1, 8, 8), np.float32)
        out.update(zip(rest, sess.run(rest, {sess.get_inputs()[0].name: x})))
    return out


def run(tmp_path, name, **kw) -> tuple[dict, dict[str, np.ndarray]]:
    out = tmp_path / f"{name}.onnx"
    rep = compress(MODEL, out, "digits", quiet=True, **FAST, **kw)
    return rep, onnx_weights(out)


def distinct(w: np.ndarray, axis: int | None = None) -> int:
    if axis is None:
        return len(np.unique(w))
    return max(len(np.unique(np.take(w, i, axis=axis))) for i in range(w.shape[axis]))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_uniform_bits_per_tensor(tmp_path, bits):
    rep, w = run(tmp_path, f"b{bits}", bits=bits)
    assert rep["target_rate"] == 1.0  # --bits alone does not prune (the 0 level may add zeros)
    if bits == 1:
        assert rep["pruning_rate"] == 1.0
    for n in WEIGHTS:
        levels = np.unique(w[n])
        assert len(levels) <= (2 if bits == 1 else 2**bits - 1), n
        if bits == 1:
            assert np.allclose(levels, [-levels[1], levels[1]])  # {-q, +q}
        else:  # symmetric uniform: every level is an integer multiple of the smallest step
            q = np.min(np.abs(levels[levels != 0]))
            assert np.allclose(levels / q, np.round(levels / q), atol=1e-4)
            assert np.max(np.abs(np.round(levels / q))) <= 2 ** (bits - 1) - 1


def test_prune_quantize_with_frozen_oscillations(tmp_path):
    """End to end with freeze_oscillations: the retraining epochs report the frozen share (rising),
    and the written weights are on their grids as without it."""
    kw = dict(FAST, retrain_epochs=3, max_batches_per_epoch=10, freeze_oscillations=0.001)
    out = tmp_path / "frz.onnx"
    rep = compress(MODEL, out, "digits", quiet=True, rate=8, bits=3, **kw)
    w = onnx_weights(out)
    frozen = [h["frozen"] for h in rep["history"] if h["kind"] == "retrain" and h["step"] == len(rep["steps"]) - 1]
    assert len(frozen) == 3 and 0 < frozen[0] <= frozen[-1] <= 1
    assert not any("frozen" in h for h in rep["history"] if h["kind"] == "admm")
    for n in WEIGHTS:
        nz = np.unique(w[n][w[n] != 0])
        assert 0 < len(nz) <= 8
        mags = np.unique(np.concatenate([[0.0], np.abs(nz)]))
        q = np.min(np.diff(mags))
        assert np.allclose(nz / q, np.round(nz / q), atol=1e-4)


def test_per_channel_levels(tmp_path):
    rep, w = run(tmp_path, "ch", bits=2, granularity="channel")
    for n in WEIGHTS:
        axis = 0  # every compressible weight of this model has its output channels on axis 0
        assert distinct(w[n], axis) <= 3
        assert distinct(w[n]) > 3  # the steps differ between channels


def test_prune_then_quantize(tmp_path):
    rep, w = run(tmp_path, "pq", rate=8, bits=3)
    assert rep["pruning_rate"] >= 8 * 0.99
    assert rep["steps"][-1] == 8  # the quantization step comes last, at the final rate
    assert any(h.get("kind") == "admm" and h["step"] == len(rep["steps"]) - 1 for h in rep["history"])
    tops = []
    for n in WEIGHTS:
        nz = np.unique(w[n][w[n] != 0])
        # a pruned layer's zeros are stored by position: its kept entries get every 3-bit code,
        # +-q .. +-4q; a layer the allocation left dense has 7 levels, 0 among them
        assert len(nz) <= rep["quantization"][n]["levels"] in (7, 8) and rep["quantization"][n]["bits"] == 3
        mags = np.unique(np.concatenate([[0.0], np.abs(nz)]))
        q = np.min(np.diff(mags))  # the step, or a multiple of it where a level is unused
        assert np.allclose(nz / q, np.round(nz / q), atol=1e-4)
        tops.append(int(np.max(np.abs(np.round(nz / q)))))
    assert max(tops) <= 4 and rep["quantization"]["fc1.weight"]["levels"] == 8  # 32,768 -> ~2,600
    total = sum(SIZES.values())
    assert total / sum(int(np.count_nonzero(w[n])) for n in WEIGHTS) >= 8 * 0.99


def test_clusters(tmp_path):
    rep, w = run(tmp_path, "cl", clusters=4)
    for n in WEIGHTS:
        assert len(np.unique(w[n][w[n] != 0])) <= 4


def test_binary_with_edge_layers_at_8_bits(tmp_path):
    rep, w = run(tmp_path, "edge", bits=1, edge_bits=8)
    first, last = WEIGHTS[0], WEIGHTS[-1]
    for n in WEIGHTS[1:-1]:
        assert len(np.unique(w[n])) == 2
    for n in (first, last):
        assert 2 < len(np.unique(w[n])) <= 255


def test_onnxruntime_matches_report(tmp_path):
    rep, _ = run(tmp_path, "orc", rate=4, bits=2)
    ds = load_data("digits", input_specs_of(load_model(MODEL)))
    # the report's accuracy was measured by onnxruntime on the held-out split: recompute it
    _, val = ds.split(rep["config"]["val_fraction"], rep["config"]["seed"])
    sess = ort.InferenceSession(str(tmp_path / "orc.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": val.inputs["input"]})[0]
    acc = float((logits.argmax(1) == val.labels).mean())
    assert acc == pytest.approx(rep["accuracy"]["compressed"], abs=1e-9)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 2.5}, "bits"),
        ({"bits": 4, "clusters": 8}, "alternatives"),
        ({"clusters": 1}, "clusters"),
        ({"edge_bits": 8}, "edge_bits needs"),
        ({"bits": 4, "granularity": "row"}, "granularity"),
    ],
)
def test_quant_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CompressConfig(**kw).validate()


def test_retraining_keeps_levels_and_moves_centroids():
    """Straight-through retraining: the forward pass sees weights on the frozen grid, the shadow
    weights learn, and clustered layers' centroids move (their assignment stays)."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    x = load_data("digits", input_specs_of(proto), limit=32).inputs["input"]
    train = Dataset({"input": x}, np.arange(32) % 10)
    cfg = CompressConfig(batch_size=8, min_batches=1, max_batches_per_epoch=3).validate()
    keep = [dict(SIZES)]
    quant = [{"conv2.weight": QuantSpec(bits=2), "fc1.weight": QuantSpec(clusters=4)}]
    e = Engine(module, heads, train, train, None, cfg, keep, log=lambda s: None, quiet=True, quant=quant)
    e.hard_prune(0)
    before = {n: e.params[n].detach().clone() for n in quant[0]}
    book0 = e.state.grids["fc1.weight"].codebook[0].clone()
    codes0 = e.state.codes["fc1.weight"].clone()
    e.train_epoch(Unit("retrain", 0, 0), e.make_optimizer(1e-2), "t")
    shadow = {n: e.params[n].detach().clone() for n in quant[0]}
    assert not torch.equal(shadow["conv2.weight"], before["conv2.weight"])  # the shadow trained
    e.finalize()
    conv2 = e.params["conv2.weight"].detach()
    assert len(torch.unique(conv2)) <= 3
    step = e.state.grids["conv2.weight"].step
    assert torch.allclose(conv2 / step, torch.round(conv2 / step), atol=1e-5)
    fc1 = e.params["fc1.weight"].detach()
    codes = e.state.codes["fc1.weight"]
    book = e.state.grids["fc1.weight"].codebook[0]
    assert torch.equal(codes, codes0)  # the assignment is frozen
    assert not torch.equal(book, book0)  # the centroids trained
    assert len(torch.unique(fc1[codes >= 0])) <= 4
    for j in range(4):  # every member takes its centroid's value
        if (codes == j).any():
            assert torch.all(fc1[codes == j] == book[j])


def test_quantized_retraining_pulls_shadows_to_their_levels():
    """quant_damping adds quant_damping * (w - q(w)) to a uniform layer's shadow gradient (the pull
    that keeps shadows off the rounding thresholds) and nothing to a clustered layer's."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    train = Dataset({"input": np.zeros((8, 1, 8, 8), np.float32)}, np.arange(8) % 10)
    quant = [{"conv2.weight": QuantSpec(bits=2), "fc2.weight": QuantSpec(clusters=2)}]
    for lam in (0.0, 0.5):
        cfg = CompressConfig(batch_size=8, min_batches=1, quant_damping=lam).validate()
        e = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True, quant=quant)
        e.hard_prune(0)
        w = e.params["conv2.weight"].detach().clone()
        q = e.quantized("conv2.weight", w)
        assert not torch.equal(w, q)  # the shadow is off its levels
        e.params["conv2.weight"].grad = torch.ones_like(w)
        e.params["fc2.weight"].grad = None
        e.add_damping_grad()
        assert torch.allclose(e.params["conv2.weight"].grad, 1.0 + lam * (w - q))
        assert e.params["fc2.weight"].grad is None
    with pytest.raises(ConfigError, match="quant_damping"):
        CompressConfig(quant_damping=-1).validate()


def test_oscillating_weights_freeze_at_their_average_level(tmp_path):
    """freeze_oscillations: a weight whose level flips back and forth every step is frozen once the
    moving average of its reversals passes the threshold, at the level nearest its moving-average
    value (its shadow exactly on that level), and put back there after any later step; weights that
    move one way are never frozen; clustered layers are not tracked; a checkpoint keeps the state
    and the next quantization step starts afresh."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    train = Dataset({"input": np.zeros((8, 1, 8, 8), np.float32)}, np.arange(8) % 10)
    quant = [{"conv2.weight": QuantSpec(bits=3), "fc2.weight": QuantSpec(clusters=2)}]
    cfg = CompressConfig(batch_size=8, min_batches=1, freeze_oscillations=0.05).validate()
    e = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True, quant=quant)
    e.hard_prune(0)
    p = e.params["conv2.weight"]
    cb = torch.sort(e.state.grids["conv2.weight"].codebook[0]).values
    lo, hi = float(cb[-2]), float(cb[-1])
    mid, eps = (lo + hi) / 2, (hi - lo) / 10
    flip, drift = 3, 5  # element 3 flips between the top two levels; element 5 climbs once
    with torch.no_grad():
        p.view(-1)[drift] = lo - eps
    frozen_at = None
    for t in range(40):
        with torch.no_grad():
            if frozen_at is None or t % 2:  # after freezing, keep trying to move it
                p.view(-1)[flip] = mid + eps * (1 if t % 2 else -1)
            p.view(-1)[drift] = lo - eps + (hi - lo) * min(t, 10) / 10  # one way, no reversal
        e.track_oscillations()
        o = e.state.osc["conv2.weight"]
        if frozen_at is None and o["frozen"].view(-1)[flip]:
            frozen_at = t
    assert "fc2.weight" not in e.state.osc
    o = e.state.osc["conv2.weight"]
    # an 8-bit layer is not tracked (its steps are too fine for oscillations to matter)
    e8 = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True,
                quant=[{"conv2.weight": QuantSpec(bits=8)}])  # fmt: skip
    e8.hard_prune(0)
    e8.track_oscillations()
    assert e8.state.osc == {}
    # reversals from the third step on, each adding 1% to the average: 0.05 is passed at the 6th
    assert frozen_at == 2 + 5
    assert int(o["frozen"].sum()) == 1 and not o["frozen"].view(-1)[drift]
    value = float(p.detach().view(-1)[flip])
    assert value in (lo, hi)  # exactly on a level: no rounding threshold nearby
    assert e.frozen_fraction() == pytest.approx(1 / p.numel())
    # checkpoints keep the tracking; a new quantization step starts afresh
    e.save(tmp_path / "ck.pt", None, {})
    blob = torch.load(tmp_path / "ck.pt", weights_only=False)
    e2 = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True, quant=quant)
    e2.load(blob)
    assert torch.equal(e2.state.osc["conv2.weight"]["frozen"], o["frozen"])
    e.hard_prune(0)
    assert e.state.osc == {}
    # off: nothing tracked
    cfg_off = CompressConfig(batch_size=8, min_batches=1, freeze_oscillations=0).validate()
    off = Engine(module, heads, train, train, None, cfg_off, [dict(SIZES)], lambda s: None, True, quant=quant)
    off.hard_prune(0)
    off.track_oscillations()
    assert off.state.osc == {} and off.frozen_fraction() is None
    with pytest.raises(ConfigError, match="freeze_oscillations"):
        CompressConfig(freeze_oscillations=-0.1).validate()


def test_centroid_step_uses_the_summed_member_gradient():
    """A centroid's gradient is the sum of its members' gradients: with members pushing both ways,
    the sign of the sum decides, and Adam's first step moves it by lr against that sign."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    train = Dataset({"input": np.zeros((8, 1, 8, 8), np.float32)}, np.arange(8) % 10)
    cfg = CompressConfig(batch_size=8, min_batches=1).validate()
    e = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True,
               quant=[{"fc2.weight": QuantSpec(clusters=2)}])
    e.hard_prune(0)
    codes = e.state.codes["fc2.weight"]
    book0 = e.state.grids["fc2.weight"].codebook[0].clone()
    grad = torch.zeros_like(e.params["fc2.weight"])
    members0 = torch.nonzero(codes.flatten() == 0).squeeze(1)
    members1 = torch.nonzero(codes.flatten() == 1).squeeze(1)
    # centroid 0: one member +3, all others -1 each (sum negative when it has more than 3 others);
    # centroid 1: every member +1 (sum positive)
    g = grad.flatten()
    g[members0] = -1.0
    g[members0[0]] = 3.0
    g[members1] = 1.0
    e.params["fc2.weight"].grad = grad
    e.step_centroids(0.01)
    book = e.state.grids["fc2.weight"].codebook[0]
    s0 = float(g[members0].sum())
    assert float(book[0] - book0[0]) == pytest.approx(-0.01 * np.sign(s0), rel=1e-4)
    assert float(book[1] - book0[1]) == pytest.approx(-0.01, rel=1e-4)
    assert e.params["fc2.weight"].grad is None


def test_readme_default_rate_without_quantization():
    assert CompressConfig().validate().rate == 20.0
    assert CompressConfig(bits=4).validate().rate == 1.0
    assert CompressConfig(bits=4, rate="50x").validate().rate == 50.0


def test_retraining_lr_decays_with_cosine_in_quiet_mode():
    """The schedule counts batches itself (a disabled progress bar does not count them)."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    x = load_data("digits", input_specs_of(proto), limit=24).inputs["input"]
    train = Dataset({"input": x}, np.arange(24) % 10)
    cfg = CompressConfig(batch_size=8, min_batches=1, retrain_epochs=1, retrain_lr=1e-3).validate()
    e = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], log=lambda s: None, quiet=True)
    e.hard_prune(0)
    opt = e.make_optimizer(cfg.retrain_lr)
    e.train_epoch(Unit("retrain", 0, 0), opt, "t")  # 3 batches: lr at progress 0, 1/3, 2/3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 2 / 3)))
    cfg.retrain_schedule = "constant"
    opt = e.make_optimizer(cfg.retrain_lr)
    e.train_epoch(Unit("retrain", 0, 0), opt, "t")
    assert opt.param_groups[0]["lr"] == 1e-3


def test_auto_format_packs_a_layer_only_where_that_is_smaller(tmp_path):
    """auto: the quantized layers go into packed form (one shared decoder where the opset allows,
    else one each) only where that takes fewer bytes than plain floats; the file is no larger than
    every layer plain, or each packed alone where that beats its floats (the rule without shared
    decoders). ``codebook`` packs every one."""
    from onnxadmm.compress.pipeline import _plain_cost
    from onnxadmm.export.storage import apply_storage, encode_from_values, expand_storage, file_cost

    rep, w = run(tmp_path, "auto4", bits=4)
    assert rep["format"]["packed_error"] is None
    packed = set(rep["format"]["codebook_tensors"])
    assert "fc1.weight" in packed
    written = onnx.load(tmp_path / "auto4.onnx")
    plain = expand_storage(written)
    singles = {}
    for n in WEIGHTS:
        levels = np.unique(w[n])
        assert len(levels) <= 15, n
        enc = min(
            (encode_from_values(w[n], levels, sparse=s) for s in (False, True)), key=lambda e: file_cost(e, n)
        )
        if file_cost(enc, n) < _plain_cost(n, w[n]):
            singles[n] = enc
    one_each = apply_storage(plain, singles, bundle=False)
    assert written.ByteSize() <= min(plain.ByteSize(), one_each.ByteSize())
    rep_cb, w_cb = run(tmp_path, "cb4", bits=4, fmt="codebook")
    assert set(rep_cb["format"]["codebook_tensors"]) == set(WEIGHTS)
    for n in WEIGHTS:
        assert np.array_equal(w_cb[n], w[n]), n  # same training (same seed), only the storage differs


def test_auto_format_keeps_a_tiny_quantized_layer_plain():
    """36 weights on 16 clusters: 144 bytes of floats, less than any decoder's nodes."""
    from onnx import helper

    from onnxadmm.compress.pipeline import _encodings, _select_storage
    from onnxadmm.compress.quantize import Grid

    rng = np.random.default_rng(0)
    book = np.sort(rng.standard_normal(16)).astype(np.float32)
    w = book[rng.integers(0, 16, (4, 1, 3, 3))]
    proto = helper.make_model(
        helper.make_graph([], "g", [], [], [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    grids = {"w": Grid(torch.from_numpy(book)[None], None, "cluster", 4)}
    assert _select_storage("auto", _encodings("auto", grids, {"w": w}, proto), {"w": w}, proto)[0] == {}
    enc = _encodings("codebook", grids, {"w": w}, proto)["w"]
    assert enc.levels == len(np.unique(w)) and enc.stored == 36  # unused levels compacted away


def test_int8_file_holds_the_trained_biases_and_weights(tmp_path):
    """--format int8 writes what training made: the int8 weights are the trained 8-bit grid and the
    int32 biases dequantize to the trained biases (the same run written as float is the reference)."""
    dense = tmp_path / "f.onnx"
    compress(MODEL, dense, "digits", quiet=True, bits=8, fmt="dense", **FAST)
    int8 = tmp_path / "i8.onnx"
    rep = compress(MODEL, int8, "digits", quiet=True, bits=8, fmt="int8", **FAST)
    assert rep["format"]["int8"]["float_weights"] == []
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dense)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(int8)).graph.initializer}
    moved = []
    for w in WEIGHTS:
        q = got[f"{w}_quantized"].astype(np.float64) * got[f"{w}_scale"]
        np.testing.assert_allclose(q, want[w], rtol=0, atol=1e-6 * np.abs(want[w]).max())
        b = w.replace("weight", "bias")
        step = float(got[f"{b}_quantized_scale"].reshape(-1)[0])
        deq = got[f"{b}_quantized"].astype(np.float64) * step
        assert np.abs(deq - want[b]).max() <= step  # the trained bias, to one int32 step
        moved.append(np.abs(want[b] - original[b]).max() / step)
    assert max(moved) > 3  # training moved the biases by more than the tolerance above


@pytest.mark.parametrize("half", [True, False])
def test_finalize_moves_levels_to_float16_keeping_every_code(half):
    """float16_levels: the final weights sit on float16-exact levels, and each keeps the level its
    shadow rounds to on the trained grid, also shadows right at a rounding threshold (which the
    moved step would send the other way if the shadows were projected again)."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    train = Dataset({"input": np.zeros((8, 1, 8, 8), np.float32)}, np.arange(8) % 10)
    quant = [{"conv2.weight": QuantSpec(bits=3), "fc1.weight": QuantSpec(clusters=4)}]
    cfg = CompressConfig(batch_size=8, min_batches=1, float16_levels=half).validate()
    e = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True, quant=quant)
    e.hard_prune(0)
    grid = e.state.grids["conv2.weight"]
    step = float(grid.step[0])
    rng = np.random.default_rng(0)
    shape = e.params["conv2.weight"].shape
    k = rng.integers(-3, 3, shape)  # shadows just either side of the threshold between k and k + 1
    side = rng.choice([-1e-4, 1e-4], shape)
    with torch.no_grad():
        e.params["conv2.weight"].copy_(torch.tensor((k + 0.5 + side) * step, dtype=torch.float32))
    expected = torch.round(e.quantized("conv2.weight", e.params["conv2.weight"].detach()) / step)
    e.finalize()
    new = e.state.grids["conv2.weight"]
    w = e.params["conv2.weight"].detach()
    assert torch.equal(torch.round(w / new.step[0]), expected)  # every weight kept its level
    book = e.state.grids["fc1.weight"].codebook
    for levels in (new.codebook, book):  # (the trained levels of this seed are not float16 values)
        assert torch.equal(levels.half().float(), levels) == half
    assert half or float(new.step[0]) == step
    fc1 = e.params["fc1.weight"].detach()
    codes = e.state.codes["fc1.weight"]
    assert all(torch.all(fc1[codes == j] == book[0, j]) for j in range(4))


def test_zero_level_keeps_a_zero_among_the_levels(tmp_path):
    """``zero_level=True``: a pruned layer's 3-bit grid is the symmetric -3q..3q (kept weights may
    round to 0 and prune further), as before session 17; the default gives them +-q .. +-4q."""
    rep, w = run(tmp_path, "z", rate=8, bits=3, zero_level=True)
    assert rep["config"]["zero_level"] is True
    assert rep["quantization"]["fc1.weight"]["levels"] == 7
    nz = np.unique(w["fc1.weight"][w["fc1.weight"] != 0])
    assert len(nz) <= 6


def test_centroids_step_at_their_layers_lr():
    """With lr_relative, a clustered layer's centroids move at its optimizer group's lr: Adam's
    first centroid step is exactly that lr (conv2 of the digits model: rms 0.134, lr x 1.34)."""
    proto = load_model(MODEL)
    heads = training_heads(proto)
    module = OnnxGraphModule(proto, outputs=[h.name for h in heads])
    x = load_data("digits", input_specs_of(proto), limit=8).inputs["input"]
    train = Dataset({"input": x}, np.arange(8) % 10)
    cfg = CompressConfig(
        batch_size=8, min_batches=1, max_batches_per_epoch=1, retrain_schedule="constant", retrain_lr=1e-3
    ).validate()
    n = "conv2.weight"
    e = Engine(module, heads, train, train, None, cfg, [dict(SIZES)], lambda s: None, True,
               quant=[{n: QuantSpec(clusters=4)}])  # fmt: skip
    rms = float(e.params[n].detach().double().pow(2).mean().sqrt())
    assert 0.01 * rms > 1e-3  # the layer is above the floor
    e.hard_prune(0)
    book0 = e.state.grids[n].codebook[0].clone()
    e.train_epoch(Unit("retrain", 0, 0), e.make_optimizer(cfg.retrain_lr), "t")
    moved = (e.state.grids[n].codebook[0] - book0).abs()
    assert torch.allclose(moved, torch.full_like(moved, 0.01 * rms), rtol=1e-3), (moved, rms)
