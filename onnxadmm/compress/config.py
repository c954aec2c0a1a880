"""CompressConfig: every knob of a compression run, with defaults, parsing and file loading."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError


def parse_rate(text) -> float:
    """'20x', '20', '20.5x' -> 20.0; '95%' (sparsity) -> 20.0. Rejects rates below 1x and nonsense."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(x|%)?", s)
        if not m:
            raise ConfigError(
                f"rate {text!r}: expected a pruning rate like 20x (keep 1/20 of the weights) or 95%"
            )
        value = float(m.group(1))
        if m.group(2) == "%":
            if not 0 <= value < 100:
                raise ConfigError(f"rate {text!r}: sparsity must be in [0%, 100%)")
            value = 100.0 / (100.0 - value)
    if not math.isfinite(value) or value < 1.0:
        raise ConfigError(
            f"rate {text!r}: the pruning rate is (all weights)/(non-zero weights) and must be at least 1x, e.g. 20x"
        )
    return value


@dataclass
class CompressConfig:
    """Defaults suit small CNN/MLP classifiers on a CPU; every field can be set from --config."""

    rate: float | None = None  # overall pruning rate over compressible weights [20x; 1x when quantizing]
    bits: int | None = None  # quantize the (remaining) weights to this many bits; 1 = binarize {-q, +q}
    clusters: int | None = None  # or share at most this many values per layer (k-means centroids)
    structure: str = "none"  # none | filter | channel | shape: prune single weights or whole groups
    shrink: bool = True  # cut channels that pruning left without effect out of the written layers
    granularity: str = "tensor"  # tensor | channel: one quantization step per layer or per output channel
    edge_bits: int | None = None  # bits for the first and last compressible layers (None: as --bits)
    layer_rates: dict = field(default_factory=dict)  # {onnx weight name: rate} fixed per-layer rates
    exclude: list = field(default_factory=list)  # weight names or glob patterns left dense
    # automatic per-layer rates: layer i keeps c * n_i ** power weights (None: auto, 0.3 for single
    # weights, 1.0, the same fraction of every layer's groups, with --structure)
    allocation_power: float | None = None
    progressive: bool = True  # reach high rates in steps
    step_factor: float = 8.0  # largest rate ratio between two progressive steps
    admm_iterations: int = 6  # ADMM iterations per step (each one W-step of epochs_per_iteration)
    # training epochs per ADMM iteration (None: auto, 1, or 2 when pruning alone to long_admm_rate
    # or more: LeNet-5 at 246x, 98.99% mean of four runs against 98.91%; no gain at 100x)
    epochs_per_iteration: float | None = None
    long_admm_rate: float = 200.0
    retrain_epochs: float = 4.0  # masked retraining epochs per step
    final_retrain_epochs: float | None = None  # retraining epochs of the final step (None: auto, below)
    rho: float = 1e-3  # initial ADMM penalty
    rho_multiplier: float = 3.0  # rho grows by this per ADMM iteration (multi-rho): 1e-3 .. 0.24 in 6
    rho_max: float = 1.0
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3  # W-step learning rate
    retrain_lr: float = 1e-3  # masked retraining learning rate (cosine decay to 0 per step)
    # Adam: each trainable tensor's step (weights, biases, normalisation) is at least this fraction
    # of its rms in the input model (0: off). Adam moves every value by about lr a step whatever its
    # size: at 1e-3 a tensor of rms 0.5 changes by 0.2% a step, LeNet-5's weights (rms 0.05) by 2%.
    # Tensors of rms up to lr / lr_relative (0.1) keep lr. The tiny Keras MNIST models (weights of rms
    # 0.4-1.5, biases ~1) lost 0.48 / 0.22 points at 3x without labels, 0.05 / 0.04 with it
    # (docs/benchmarks.md, "Adam step floor", session 20)
    lr_relative: float = 0.01
    final_retrain_lr: float | None = None  # retraining lr of the final step (None: auto, below)
    # The final step is the one that reaches the final pruning rate (the quantization step when
    # nothing is pruned). Auto: from restart_rate up, its retraining restarts at 10x retrain_lr for
    # 2x retrain_epochs (learning-rate rewinding: a very sparse network must move its few weights far;
    # LeNet-5 at 100x: 99.10% against 98.97%, at 20x it would cost 0.2 points); below, as other steps,
    # except with filter pruning, which restarts at any rate.
    restart_rate: float = 100.0
    retrain_schedule: str = "cosine"  # cosine (decay to 0 over each step's retraining) | constant
    momentum: float = 0.9  # sgd only
    batch_size: int = 128
    distill: float | None = None  # weight of distillation from the original when labels exist
    # (None: 1 when every training output is a classifier and the original's outputs fit in memory, else 0)
    # distillation temperature: 4 beat 2 on LeNet-5 at every rate (20x-246x: +0.08 to +0.16 points, GPU
    # sweep of session 11); 6 was worse
    temperature: float = 4.0
    # quantized retraining: pull of each straight-through shadow towards its level (0: off). It steadies
    # the 3-bit retraining of small sparse layers but raised no final accuracy, and cost binarizing
    # LeNet-5 0.3 points (docs/benchmarks.md, session 14)
    quant_damping: float = 0.0
    # quantized retraining (uniform and binary levels below 8 bits): freeze a weight whose level oscillates, once
    # the moving average (over ~100 steps) of its level reversals exceeds this rate per step; it stays
    # at the level its moving-average value rounds to (Nagel et al., 2022). 0: off. LeNet-5 two-step
    # (filter 20x, then 13x + 3 bits): 98.90-99.09% in six seeds against 98.79-99.00% without;
    # dense LeNet-5 at 1-4 bits within -0.01..+0.06 points, int8 -0.09 (so not at 8 bits); about 5%
    # more time (session 21)
    freeze_oscillations: float = 0.02
    # after training, move each quantized layer's levels onto values float16 holds exactly where that
    # shifts none by more than 1/32 of a step (every grid up to 4 bits, every centroid; most 8-bit
    # grids stay): the codebooks in the file take half the bytes (LeNet-5 pruned 259x at 3 bits: 56
    # of its ~1,770 bytes of weights)
    float16_levels: bool = True
    # uniform levels of a pruned layer (below 8 bits): False gives its kept weights every code of
    # --bits (2^bits non-zero levels, its zeros stored by position); True keeps a zero level among
    # 2^bits - 1 symmetric ones, so kept weights may round to 0 and prune further. LeNet-5 two-step
    # (filter 20x, then 12.5x + bits inside): 2 bits 98.45% against 97.84%; 3 bits 98.91% against
    # 99.02% / 98.79% / 98.77% (docs/benchmarks.md, session 17)
    zero_level: bool = False
    # what a pruned layer keeps: magnitude (|w|) or activation (|w| x the rms of the input feature it
    # multiplies on the training data; a large weight on a nearly dead input goes first;
    # compress/importance.py); auto: activation when training without labels (distillation only),
    # magnitude with labels. Without labels the nine MNIST models of shared/models lose as much or
    # less with activation in every case (mnist-lg at 3x: 0.22 points against 2.93, mnist-sm 0.60
    # against 0.95, the others within +-0.2; docs/benchmarks.md, sessions 18-19); with labels
    # LeNet-5 at 246x gave 98.94% against 99.04% (one run each), so labels keep magnitude
    importance: str = "auto"
    pseudo_labels: float = 1.0  # without labels: weight of cross-entropy on the original's top-1
    # class, added to the distillation of classifier outputs (0: distillation alone)
    val_fraction: float = 0.1  # held out when no --val-data is given
    seed: int = 0
    device: str = "cpu"  # torch device for training: cpu, cuda, cuda:N, mps, or auto (cuda where usable)
    min_batches: int = 200  # floor on optimizer steps per ADMM iteration / retraining epoch (small datasets)
    max_batches_per_epoch: int | None = None  # cap for quick runs

    @property
    def quantizing(self) -> bool:
        return bool(self.bits or self.clusters)

    def validate(self) -> CompressConfig:
        if self.rate is None:
            self.rate = 1.0 if (self.bits or self.clusters) else 20.0
        self.rate = parse_rate(self.rate)
        if self.bits is not None and self.clusters is not None:
            raise ConfigError("bits and clusters are alternatives: give one of them")
        for name in ("bits", "edge_bits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or not 1 <= int(v) <= 8):
                raise ConfigError(f"{name} {v!r}: expected a whole number of bits from 1 to 8")
        if self.edge_bits is not None and not self.quantizing:
            raise ConfigError("edge_bits needs bits or clusters")
        if self.clusters is not None and (int(self.clusters) != self.clusters or not 2 <= self.clusters <= 256):
            raise ConfigError(f"clusters {self.clusters!r}: expected a whole number from 2 to 256")
        from .pruning import STRUCTURES

        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure {self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        from .importance import IMPORTANCE

        if self.importance not in IMPORTANCE:
            raise ConfigError(f"importance {self.importance!r}: expected {' or '.join(IMPORTANCE)}")
        if self.granularity not in ("tensor", "channel"):
            raise ConfigError(f"granularity {self.granularity!r}: expected tensor or channel")
        self.layer_rates = {k: parse_rate(v) for k, v in dict(self.layer_rates).items()}
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer {self.optimizer!r}: expected adam or sgd")
        if self.retrain_schedule not in ("cosine", "constant"):
            raise ConfigError(f"retrain_schedule {self.retrain_schedule!r}: expected cosine or constant")
        for name in ("step_factor", "rho", "rho_multiplier", "rho_max", "lr", "retrain_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.long_admm_rate >= 1:
            raise ConfigError(f"long_admm_rate {self.long_admm_rate!r}: expected a rate of at least 1")
        if not self.restart_rate >= 1:
            raise ConfigError(f"restart_rate {self.restart_rate!r}: expected a rate of at least 1")
        if self.final_retrain_lr is not None and not self.final_retrain_lr > 0:
            raise ConfigError(f"final_retrain_lr must be positive, got {self.final_retrain_lr!r}")
        if self.step_factor <= 1:
            raise ConfigError("step_factor must be above 1")
        for name in ("admm_iterations", "batch_size"):
            v = getattr(self, name)
            whole = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v == int(v)
            if not whole or int(v) < 1:
                raise ConfigError(f"{name} {v!r}: expected a whole number of at least 1")
            setattr(self, name, int(v))
        for name in (
            "epochs_per_iteration", "retrain_epochs", "final_retrain_epochs", "distill", "pseudo_labels",
            "quant_damping", "lr_relative", "freeze_oscillations",
        ):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.allocation_power is not None and not 0 <= self.allocation_power <= 1:
            raise ConfigError(f"allocation_power {self.allocation_power!r}: expected a number from 0 to 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction must be between 0 and 1")
        self.device = training_device(self.device)  # the report and the checkpoint show the one used
        return self

    def power(self) -> float:
        """The allocation power in effect: ``allocation_power``, or by default 0.3 for unstructured
        pruning (LeNet-5: the small, sensitive layers keep more) and 1.0 for structured pruning
        (LeNet-5 channel pruning at 20x: 99.17% against 98.02% at 0.3, which left conv2 2 filters)."""
        if self.allocation_power is not None:
            return self.allocation_power
        return 0.3 if self.structure == "none" else 1.0

    def restarts(self, prunes: bool = True) -> bool:
        """Whether the final step's retraining restarts at a higher lr by default: from
        ``restart_rate`` up, and with filter pruning at any rate (removing whole filters and their
        biases is a large change even at 4x: ResNet-8 filter 4x 98.74% against 98.19%, LeNet-5
        filter 10x / 20x 99.21% / 99.04% against 99.13% / 98.97%; channel pruning does not restart:
        LeNet-5 channel 10x / 20x lost 0.20 / 0.09 points with it)."""
        if not prunes or self.rate is None:
            return False
        return self.rate >= self.restart_rate or (self.structure == "filter" and self.rate > 1)

    def iteration_epochs(self) -> float:
        """Training epochs per ADMM iteration: ``epochs_per_iteration``, or by default 1, and 2 for
        unstructured pruning without quantization from ``long_admm_rate`` up (a very sparse target
        needs the W-step to move further between two Z-steps)."""
        if self.epochs_per_iteration is not None:
            return self.epochs_per_iteration
        long = self.rate is not None and self.rate >= self.long_admm_rate
        return 2.0 if long and self.structure == "none" and not self.quantizing else 1.0

    def final_epochs(self, prunes: bool = True) -> float:
        if self.final_retrain_epochs is not None:
            return self.final_retrain_epochs
        return 2 * self.retrain_epochs if self.restarts(prunes) else self.retrain_epochs

    def final_lr(self, prunes: bool = True) -> float:
        if self.final_retrain_lr is not None:
            return self.final_retrain_lr
        return 10 * self.retrain_lr if self.restarts(prunes) else self.retrain_lr

    def retrain_epochs_of(self, step: int, final_step: int) -> float:
        """Masked retraining epochs of step ``step`` (0-based); ``final_step``: the final step's index."""
        return self.final_epochs() if step == final_step else self.retrain_epochs

    def retrain_lr_of(self, step: int, final_step: int) -> float:
        """Masked retraining learning rate of step ``step``; ``final_step``: the final step's index."""
        return self.final_lr() if step == final_step else self.retrain_lr

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **kw) -> CompressConfig:
        known = {f.name for f in fields(self)}
        bad = [k for k in kw if k not in known]
        if bad:
            raise ConfigError(f"unknown setting(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        d = self.to_dict()
        d.update({k: v for k, v in kw.items() if v is not None})
        return CompressConfig(**d)


def training_device(text: str) -> str:
    """The torch device a run trains on (``auto``: cuda where torch can use a GPU, else cpu), or a
    one-line ConfigError saying why the one asked for cannot be used."""
    import torch

    s = str(text).strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return s
    m = re.fullmatch(r"(cuda|mps)(?::(\d+))?", s)
    if not m:
        raise ConfigError(f"device {text!r}: expected cpu, cuda, cuda:N, mps or auto")
    if m.group(1) == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {text!r}: this torch ({torch.__version__}) has no usable MPS device")
        return s
    if not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ConfigError(f"device {text!r}: this torch ({torch.__version__}) {why}; use --device cpu")
    if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
        raise ConfigError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return s


def load_config_file(path) -> dict:
    """Settings from a TOML or JSON file; a [layers] table maps weight names to {rate=..} or {exclude=true}."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found")
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(p.read_text())
        else:
            import tomllib

            raw = tomllib.loads(p.read_text())
    except Exception as exc:
        raise ConfigError(f"config file {p}: cannot parse ({exc})") from None
    raw = dict(raw.get("compress", raw))
    layers = raw.pop("layers", {}) or {}
    rates = dict(raw.pop("layer_rates", {}) or {})
    exclude = list(raw.pop("exclude", []) or [])
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            raise ConfigError(
                f"config layers.{name}: expected a table like {{rate = '10x'}} or {{exclude = true}}"
            )
        if spec.get("exclude"):
            exclude.append(name)
        elif "rate" in spec:
            rates[name] = spec["rate"]
    raw["layer_rates"] = rates
    raw["exclude"] = exclude
    return raw
