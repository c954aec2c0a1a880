"""Training outputs and losses.

The loss is taken on the model's *training outputs* (:func:`analysis.training_outputs`), with a
final Softmax replaced by its input so that cross-entropy works on logits (numerically stable).
Heads that end in LogSoftmax (or Softmax followed by Log) give log-probabilities, on which
cross-entropy is also exact. With labels: cross-entropy on the first head. Without: distillation
from the original model, KL divergence for classifier heads and MSE for the others, plus (weight
``pseudo_labels``) cross-entropy on the original's top-1 class: the KL term asks a pruned network
to match every probability of the original, which a small one cannot; the hard term keeps its
capacity on the decision that accuracy counts (wuhanstudio's 486-weight MNIST CNN at 3x: 5.3
points lost with KL alone, 0.9 with both).

A classifier head that ends in Sigmoid (one-vs-rest scores, as some MLP exports have) is trained on
the Sigmoid's input: cross-entropy on the bounded (0, 1) outputs themselves has almost no margin to
push on (michbogos's MNIST MLP: loss 1.5 at 94% accuracy), while the input has the same argmax.
Its distillation is per-output binary cross-entropy against the original's probabilities, which
keeps each score's level rather than only their ranking. A one-column Sigmoid head is a binary
classifier: binary cross-entropy on its logit against 0/1 labels, predicted class ``logit > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..importer import analysis


@dataclass
class Head:
    """One training output: ``name`` in the graph; ``kind`` logits | logprobs | sigmoid (the input
    of a final Sigmoid: per-class logits) | regression."""

    name: str
    kind: str
    axis: int = -1  # class axis
    legacy: bool = False  # opset < 13 Softmax: classes are the flattened tail from ``axis``

    def classes(self, t: torch.Tensor) -> torch.Tensor:
        """View as [rows, classes] for a classifier head."""
        if t.dim() <= 1:
            return t.reshape(1, -1)
        axis = self.axis % t.dim()
        if self.legacy:
            return t.reshape(math.prod(t.shape[:axis]), -1)
        return t.movedim(axis, -1).reshape(-1, t.shape[axis])


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def training_heads(model: onnx.ModelProto) -> list[Head]:
    producers = {o: n for n in model.graph.node for o in n.output if o}
    opset = analysis.opset_versions(model).get("", 13)
    ranks = {}
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    heads = []
    for name in analysis.training_outputs(model):
        n = producers.get(name)
        if n is not None and n.op_type == "Softmax":
            axis = _attr(n, "axis", -1 if opset >= 13 else 1)
            heads.append(Head(n.input[0], "logits", axis, legacy=opset < 13))
        elif n is not None and n.op_type == "LogSoftmax":
            heads.append(
                Head(name, "logprobs", _attr(n, "axis", -1 if opset >= 13 else 1), legacy=opset < 13)
            )
        elif (
            n is not None
            and n.op_type == "Log"
            and producers.get(n.input[0]) is not None
            and producers[n.input[0]].op_type == "Softmax"
        ):
            sm = producers[n.input[0]]
            heads.append(
                Head(name, "logprobs", _attr(sm, "axis", -1 if opset >= 13 else 1), legacy=opset < 13)
            )
        elif n is not None and n.op_type == "Sigmoid" and ranks.get(name) == 2:
            heads.append(Head(n.input[0], "sigmoid", 1))
        elif ranks.get(name) == 2:
            heads.append(Head(name, "logits", 1))
        else:
            heads.append(Head(name, "regression"))
    return heads


def refine_heads(heads: list[Head], outs: list[torch.Tensor], labels) -> list[Head]:
    """Settle rank-2 ``logits`` heads with a single column (no Softmax or Sigmoid makes them) from the
    original's outputs ``outs`` on a sample: with 0/1 labels the first is a binary classifier's logit
    (trained like a one-column Sigmoid head: binary cross-entropy, class 1 where it is above 0);
    otherwise they are regression outputs (MSE on the labels or the original's outputs)."""
    binary = labels is not None and bool(np.isin(np.asarray(labels), (0, 1)).all())
    refined = []
    for i, (h, o) in enumerate(zip(heads, outs)):
        if h.kind == "logits" and o.dim() == 2 and o.shape[1] == 1:
            h = Head(h.name, "sigmoid" if binary and i == 0 else "regression", 1)
        refined.append(h)
    return refined


def _binary(head: Head, out: torch.Tensor) -> bool:
    """A one-column Sigmoid head: a binary classifier whose score is a single logit."""
    return head.kind == "sigmoid" and head.classes(out).shape[-1] == 1


def predictions(head: Head, out: torch.Tensor) -> torch.Tensor:
    if _binary(head, out):
        return (head.classes(out)[:, 0] > 0).long()
    return head.classes(out).argmax(-1)


def _hard_loss(head: Head, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices (binary cross-entropy for a one-column Sigmoid head)."""
    if _binary(head, out):
        return F.binary_cross_entropy_with_logits(head.classes(out)[:, 0], target.float())
    return F.cross_entropy(head.classes(out), target)


def label_indices(labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() > 1 and labels.shape[-1] == 1:
        return labels[..., 0].long()  # [N, 1] class indices (binary 0/1 labels)
    return labels.argmax(-1) if labels.dim() > 1 else labels.long()


def loss_fn(
    heads: list[Head], outs, labels, teacher, distill: float, temperature: float, pseudo: float = 0.0
) -> torch.Tensor:
    """With labels, cross-entropy on the first head (MSE when it is a regression output), plus
    ``distill`` x distillation (all heads; used alone when there are no labels). The labels describe
    the first output only: the other heads of a multi-output model are always distilled (weight
    ``distill``, or 1 when it is 0), else nothing would keep them working."""
    total = outs[0].new_zeros(())
    if labels is not None and heads[0].kind == "regression":
        total = total + F.mse_loss(outs[0], labels.reshape(outs[0].shape).to(outs[0].dtype))
    elif labels is not None:
        target = labels.reshape(-1) if _binary(heads[0], outs[0]) else label_indices(labels)
        total = total + _hard_loss(heads[0], outs[0], target)
    if teacher is not None:
        T = temperature
        for i, (h, s, t) in enumerate(zip(heads, outs, teacher)):
            w = 1.0 if labels is None else distill if (i == 0 or distill > 0) else 1.0
            if w <= 0:
                continue
            if h.kind == "regression":
                total = total + w * F.mse_loss(s, t)
            elif h.kind == "sigmoid":
                sc, tc = h.classes(s) / T, h.classes(t) / T
                bce = F.binary_cross_entropy_with_logits(sc, torch.sigmoid(tc), reduction="sum")
                total = total + w * (T * T) * bce / sc.shape[0]
                if labels is None and pseudo > 0:
                    total = total + pseudo * _hard_loss(h, s, predictions(h, t))
            else:
                ls = F.log_softmax(h.classes(s) / T, -1)
                lt = F.log_softmax(h.classes(t) / T, -1)
                total = total + w * (T * T) * F.kl_div(ls, lt, log_target=True, reduction="batchmean")
                if labels is None and pseudo > 0:
                    total = total + pseudo * F.cross_entropy(h.classes(s), h.classes(t).argmax(-1))
    return total
