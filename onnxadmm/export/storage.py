"""Compact weight storage in standard ONNX: packed codes + codebook, decoded by ops folded at load.

A compressed weight (quantized, binarized, clustered, pruned, or pruned and quantized) takes few
distinct values, so it is stored as an :class:`Encoded`: one small integer *code* per stored element
and a *codebook* of values, optionally with the *positions* of the stored elements (sparse form).
:func:`apply_storage` replaces the weight's initializer by a few small initializers and a chain of
standard ``ai.onnx`` nodes whose final output carries the weight's original name, so no consumer of
the weight changes. Every input of those nodes is a constant, so onnxruntime constant-folds the
chain at session load (any optimisation level above "disabled"): the file is small, inference runs
on the same dense tensor as before, and the result is bit-exact.

Formats (``FORMAT`` = ``onnxadmm-codebook-1``), all integers unsigned, little-endian:

1. *Streams* of ``m`` values of ``w`` bits (1 <= w <= 16) are stored one of two ways:

   - *packed*: value ``i`` occupies bits ``[i*w, (i+1)*w)`` of a bit stream whose bit ``t`` is
     bit ``t % 8`` (LSB first) of byte ``t // 8``, padded with zero values to a multiple of 8
     values: ``ceil(m/8) * w`` bytes (less than ``w`` bytes above ``ceil(m*w/8)``), held as a
     ``[ceil(m/8), w]`` uint8 matrix. 8 values fill exactly one row, so the decoder extracts
     value ``j`` of every row with the same static byte indices and shift;
   - *plain*: a uint8 (w <= 8) or uint16 tensor. Widths 8 and 16 are always plain; for other
     widths ``packing="auto"`` picks whichever adds fewer bytes to the file (the packed decoder
     costs a few nodes: packing pays from a few hundred values on).
2. *Codes*: one ``bits``-bit code per stored element (C order of the stored elements). The value of
   an element with code ``c`` in group ``g`` is ``codebook[g, c]``, the group being the element's
   index along ``group_axis`` (0 without one). Dense weights keep the codes in the weight's shape.
3. *Codebook*: the ``G * K`` values, flattened, as float16 when the weight is float16 or when every
   value is exactly representable in float16 (then a ``Cast`` restores float32), else float32.
4. *Positions* (sparse form only): relative indices at ``r`` bits each (``gap_bits``), a packed
   stream of ``stored + fillers`` entries, parallel to the code stream. Entry ``d`` places its
   element ``d`` positions after the previous one (the first counts from position 0), so the
   positions are ``CumSum(d)``. A distance that does not fit is bridged by *fillers* (Deep
   Compression's filler zeros): entries with the gap value ``F = 2**r - 1`` placed on a zero of the
   gap, whose decoded value must be 0. How a filler gets its 0 (``filler_mode``), cheapest first:

   - ``zero``: every codebook row holds an exact 0; fillers carry the code of their row's 0.
   - ``append``: ``K < 2**bits``; a zero column is added to the codebook (code K) for fillers.
   - ``marker``: no free code (for example a binarized or fully used codebook): the gap value ``F``
     marks a filler, which advances ``F - 1`` positions (so a stored element's distance stays
     below ``F``); its code is ignored and the decoder points it at a zero appended to the
     codebook (``Equal`` / ``Cast`` / ``Sub`` before the ``CumSum``, ``Where`` on the indices).

   ``r`` (1..16) and the mode are chosen per tensor to minimise the bytes of both streams, the
   codebook growth and the extra nodes. All other elements decode to 0.
5. *Raw values* (``bits == 0``, sparse only: a pruned weight whose values are not quantized): no
   code stream; the stored values themselves, in order, with a 0 for each filler (``zero`` mode),
   as float32 (float16 when the weight is float16 or every value is exact in it), next to the gap
   stream of format 4. A pruned float32 weight then costs about ``4 + r/8`` bytes per stored
   element instead of the 12 of an ONNX COO sparse initializer (int64 indices).
6. *Joint entries* (sparse, with codes): the code and gap streams of format 4 merged into one
   stream of ``bits + r`` bits (at most 16) per entry, holding ``code * 2**r + gap`` (Deep
   Compression's layout). Split by ``Mod``/``Div`` by ``2**r``; chosen where one stream costs less
   than two, for example 3-bit codes and 5-bit gaps in one plain byte instead of two packed
   streams, each with its own decoder. Its bytes are reported as codes and positions in the ratio
   ``bits : r``.

Decoder (nodes and tensors named ``<tag><i>``, ``<i>`` a base-62 count, the tag (``_A``, ``_B``, ..,
``_y``, ``_zA``, ..; ``_oa<j>/`` in files before session 16) being unique to the weight and
recorded in its metadata entry; :func:`decoder_nodes` finds them): a stream is
``Cast`` to int32 (plain), or for packed ones ``Cast``, ``Gather`` of the bytes each value touches,
``MatMul`` by ``256**k`` to join them (``Mul`` + ``ReduceSum`` below opset 9), ``Div`` by the bit
offset, ``Mod 2**w`` (``Div``/``Mul``/``Sub`` below opset 10), ``Reshape`` (+ ``Slice`` of the padding). Dense weights: ``Add`` the group
offset ``K * g`` (``Range`` + ``Reshape`` to broadcast; a stored table below opset 11), ``Gather``
on the codebook (+ ``Cast`` from a float16 codebook). Sparse weights: positions ``CumSum`` of the
gaps, group offsets by ``Div``/``Mod``/``Mul`` of the positions, ``Gather``, ``ScatterElements``
into ``ConstantOfShape`` zeros, ``Reshape``. Dense decoders run at opset 7 and up, sparse ones need
opset 11 (``CumSum``, ``ScatterElements``); ``BitShift``/``BitwiseAnd`` are not needed (``Div`` and
``Mod`` on int32 do the same, and BitwiseAnd needs opset 18). ``Compress`` and ``NonZero`` are
avoided: onnxruntime 1.32 does not constant-fold them. Everything is int32 (tensors up to 2**31
elements).

When the model's opset is lower than needed, it is raised: the opset import alone when no node of
the model changes schema version, else through ``onnx.version_converter``; models whose IR version
falls below the new opset's minimum are moved to it, and those below IR 4 have their initializers
taken out of ``graph.input`` (onnxruntime treats initializers listed as inputs as constants only
below IR 4: this keeps that behaviour, and constant folding).

7. *Bundles* (:mod:`onnxadmm.export.bundle`): the weights of a model that share a dtype, stored
   as one bit stream with one decoder, each in a dense, bitmap or gaps region; chosen by
   :func:`select_storage` wherever that makes the file smaller (needs opset 11).

Accounting: :func:`storage_bytes` gives the bytes each part occupies in the file (``codes``,
``positions``, ``codebook``, ``graph``: the decoder's small constants, ``total``: the raw data, and
``nodes``: node protos, tensor names and headers), :func:`theoretical` the Deep Compression bit count
the papers report, and :func:`analyze` reads any model back (codebook-stored weights through the
``onnxadmm.storage`` metadata entry, plain dense and COO sparse float tensors by their own bytes).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import string
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxAdmmError

__all__ = [
    "Encoded",
    "FORMAT",
    "METADATA_KEY",
    "PREFIX",
    "analyze",
    "apply_storage",
    "decode",
    "decoder_nodes",
    "default_opset",
    "encode_from_values",
    "encode_sparse",
    "expand_storage",
    "file_cost",
    "raise_opset",
    "storage_bytes",
    "theoretical",
    "unfolded_decode_nodes",
]

log = logging.getLogger(__name__)

#: ``model.metadata_props`` key of the JSON description of the weights written by :func:`apply_storage`.
METADATA_KEY = "onnxadmm.storage"
#: Name of the storage format described in the module docstring.
FORMAT = "onnxadmm-codebook-1"
#: Prefix of the decoder node names of files written before the tag was recorded in the metadata
#: (``onnxadmm_decode/<weight>/<i>``): still recognised by :func:`decoder_nodes`.
PREFIX = "onnxadmm_decode/"

_DENSE_OPSET = 7  # Cast-6 (uint8/uint16), Div-7 / Mul-7 / Add-7 on int32, Gather-1, Reshape-5
_SPARSE_OPSET = 11  # CumSum-11, ScatterElements-11, Equal-11 on int32 (ConstantOfShape-9)
_MAX_GAP_BITS = 16
_INT32_LIMIT = 2**31 - 1

# Roles of the payload initializers (by the last component of their name) in storage_bytes / analyze;
# every other decoder initializer counts as "graph".
_ROLE_OF = {
    "codes": "codes",
    "data": "codes",
    "gaps": "positions",
    "codebook": "codebook",
    "step": "codebook",
    "values": "codes",
    "entries": "entries",
}


def _split_entries(nbytes: int, bits: int, gap_bits: int) -> tuple[int, int]:
    """(codes, positions) share of the bytes of a joint entry stream (format 6), in the ratio of
    their bits."""
    codes = round(nbytes * bits / (bits + gap_bits))
    return codes, nbytes - codes


# --------------------------------------------------------------------------------------------------
# Representation


@dataclass
class Encoded:
    """A weight as codes into a codebook, optionally stored sparsely.

    Attributes:
        shape: the weight's shape.
        dtype: float32 or float16, the dtype of the decoded tensor.
        codes: 1-D integers, one code per stored element, in C order of the stored elements.
        bits: 1..8; codes lie in ``[0, 2**bits)`` and are stored at exactly ``bits`` bits. 0 is the
            *raw* form (format 5, sparse only, see :func:`encode_sparse`): no codes are stored,
            ``codes`` is ``arange(stored)`` and ``codebook`` ``[1, stored]`` holds the values.
        codebook: float32 ``[G, K]`` (``K <= 2**bits``): the value of code ``j`` in group ``g``.
        group_axis: None (``G == 1``) or the axis whose index picks the codebook row
            (``G == shape[group_axis]``), usually 0, the output channel.
        positions: None (dense: every element stored in C order) or the sorted flat (C order)
            indices of the stored elements; every other element decodes to 0.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    codes: np.ndarray
    bits: int
    codebook: np.ndarray
    group_axis: int | None = None
    positions: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = np.dtype(self.dtype)
        self.codes = np.asarray(self.codes).reshape(-1)
        self.codebook = np.asarray(self.codebook, dtype=np.float32)
        if self.codebook.ndim == 1:
            self.codebook = self.codebook[None, :]
        if self.positions is not None:
            self.positions = np.asarray(self.positions).reshape(-1)

    @property
    def size(self) -> int:
        """Number of elements of the weight."""
        return math.prod(self.shape)

    @property
    def stored(self) -> int:
        """Number of stored elements (codes)."""
        return int(self.codes.size)

    @property
    def sparse(self) -> bool:
        return self.positions is not None

    @property
    def raw(self) -> bool:
        """Values stored as they are (format 5), without codes."""
        return self.bits == 0

    @property
    def value_bits(self) -> int:
        """Bits per stored element's value: the code width, or the float width in the raw form."""
        if self.bits:
            return self.bits
        return 16 if self.stored and _codebook_array(self).dtype == np.float16 else 8 * self.dtype.itemsize

    @property
    def groups(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def levels(self) -> int:
        """K, the number of codebook entries per group."""
        return int(self.codebook.shape[1])

    def validate(self) -> None:
        """Raise :class:`OnnxAdmmError` unless the fields are consistent."""
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise OnnxAdmmError(f"Encoded: dtype must be float32 or float16, not {self.dtype}")
        if not 0 <= self.bits <= 8:
            raise OnnxAdmmError(f"Encoded: bits must be 1..8 (0: raw values), not {self.bits}")
        if self.raw:
            if self.positions is None or self.group_axis is not None:
                raise OnnxAdmmError("Encoded: raw values (bits 0) need the sparse form and one group")
            if self.codebook.shape != (1, self.stored) or not np.array_equal(
                self.codes, np.arange(self.stored)
            ):
                raise OnnxAdmmError(
                    "Encoded: raw values need codes arange(stored) and a [1, stored] codebook"
                )
        elif self.codebook.ndim != 2 or not 1 <= self.levels <= 2**self.bits:
            raise OnnxAdmmError(
                f"Encoded: codebook must be [G, K] with 1 <= K <= 2**bits = {2**self.bits}, "
                f"not {self.codebook.shape}"
            )
        if not np.issubdtype(self.codes.dtype, np.integer):
            raise OnnxAdmmError(f"Encoded: codes must be integers, not {self.codes.dtype}")
        if self.codes.size and (self.codes.min() < 0 or self.codes.max() >= self.levels):
            raise OnnxAdmmError(f"Encoded: codes must lie in [0, K={self.levels})")
        if self.group_axis is None:
            if self.groups != 1:
                raise OnnxAdmmError(f"Encoded: {self.groups} codebook rows but no group_axis")
        else:
            if not 0 <= self.group_axis < len(self.shape):
                raise OnnxAdmmError(f"Encoded: group_axis {self.group_axis} out of range for {self.shape}")
            if self.groups != self.shape[self.group_axis]:
                raise OnnxAdmmError(
                    f"Encoded: {self.groups} codebook rows but axis {self.group_axis} has "
                    f"{self.shape[self.group_axis]} entries"
                )
        if self.positions is None:
            if self.codes.size != self.size:
                raise OnnxAdmmError(f"Encoded: dense form needs {self.size} codes, got {self.codes.size}")
        else:
            p = self.positions
            if p.size != self.codes.size:
                raise OnnxAdmmError(f"Encoded: {p.size} positions for {self.codes.size} codes")
            if not np.issubdtype(p.dtype, np.integer):
                raise OnnxAdmmError(f"Encoded: positions must be integers, not {p.dtype}")
            if p.size and (p[0] < 0 or p[-1] >= self.size or np.any(np.diff(p) <= 0)):
                raise OnnxAdmmError("Encoded: positions must be strictly increasing flat indices in range")
        if self.size > _INT32_LIMIT:
            raise OnnxAdmmError(f"Encoded: {self.size} elements exceed the int32 index range")

    def group_index(self, flat: np.ndarray) -> np.ndarray:
        """Codebook row of each flat (C order) element index."""
        if self.group_axis is None:
            return np.zeros(np.shape(flat), dtype=np.int64)
        inner = math.prod(self.shape[self.group_axis + 1 :])
        return (np.asarray(flat, dtype=np.int64) // inner) % self.groups


def _stored_flat(enc: Encoded) -> np.ndarray:
    return enc.positions.astype(np.int64) if enc.sparse else np.arange(enc.size, dtype=np.int64)


def decode(enc: Encoded) -> np.ndarray:
    """The dense weight an :class:`Encoded` stands for (numpy reference of the ONNX decoder)."""
    enc.validate()
    table = enc.codebook.astype(enc.dtype)
    values = table[enc.group_index(_stored_flat(enc)), enc.codes.astype(np.int64)]
    if not enc.sparse:
        return values.reshape(enc.shape)
    out = np.zeros(enc.size, dtype=enc.dtype)
    out[enc.positions.astype(np.int64)] = values
    return out.reshape(enc.shape)


def _nonzero(enc: Encoded) -> int:
    table = enc.codebook.astype(enc.dtype) != 0
    return int(np.count_nonzero(table[enc.group_index(_stored_flat(enc)), enc.codes.astype(np.int64)]))


def _file_cost(sizes: dict) -> int:
    return sizes["total"] + sizes["nodes"]


def encode_from_values(
    w: np.ndarray,
    codebook,
    group_axis: int | None = None,
    sparse: bool | None = None,
    *,
    bits: int | None = None,
    compact: bool = True,
) -> Encoded:
    """Encode a weight whose every element already lies on ``codebook``.

    Args:
        w: the weight (float32 or float16).
        codebook: ``[K]`` (one codebook) or ``[G, K]`` (one row per index along ``group_axis``).
            Values are matched exactly (``==``, so ``-0.0`` matches ``0.0``); a value that is not on
            its row raises :class:`OnnxAdmmError`.
        group_axis: the axis whose index picks the codebook row, or None for a single row.
        sparse: True stores only the non-zero elements (zeros need not be on the codebook); False
            stores every element; None picks whichever adds fewer bytes to the file
            (``total + nodes`` of :func:`storage_bytes`).
        bits: code width; by default the fewest bits that address the (compacted) codebook.
        compact: drop codebook entries no stored element uses (for example the 0 level of a
            pruned + quantized tensor in sparse form, which turns 3 levels into 2 and 2 bits into 1),
            padding shorter rows with their last value.
    """
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float16):
        raise OnnxAdmmError(f"encode_from_values: weight must be float32 or float16, not {w.dtype}")
    cb = np.asarray(codebook, dtype=np.float32)
    if cb.ndim == 1:
        cb = cb[None, :]
    groups = 1 if group_axis is None else w.shape[group_axis]
    if cb.ndim != 2 or cb.shape[0] != groups or cb.shape[1] == 0:
        raise OnnxAdmmError(f"encode_from_values: codebook {cb.shape} does not match {groups} group(s)")
    if sparse is None:
        candidates = [
            encode_from_values(w, cb, group_axis, s, bits=bits, compact=compact) for s in (False, True)
        ]
        return min(candidates, key=lambda e: _file_cost(storage_bytes(e)))

    flat = w.reshape(-1)
    positions = np.flatnonzero(flat) if sparse else None
    stored_idx = positions if sparse else np.arange(flat.size)
    values = flat[stored_idx].astype(np.float32)
    probe = Encoded(w.shape, w.dtype, np.zeros(0, np.int64), 8, cb, group_axis)
    g = probe.group_index(stored_idx)

    # exact lookup: rank every value among the codebook's distinct values, then find the first
    # entry (row, rank) in the row-major sorted keys of the codebook
    k = cb.shape[1]
    uniq = np.unique(cb + 0.0)  # +0.0 folds -0.0 into 0.0
    rank = np.minimum(np.searchsorted(uniq, values + 0.0), uniq.size - 1)
    cb_keys = (np.arange(groups)[:, None] * uniq.size + np.searchsorted(uniq, cb + 0.0)).reshape(-1)
    order = np.argsort(cb_keys, kind="stable")
    sorted_keys = cb_keys[order]
    query = g * uniq.size + rank
    j = np.minimum(np.searchsorted(sorted_keys, query), sorted_keys.size - 1)
    hit = (sorted_keys[j] == query) & (uniq[rank] == values + 0.0)
    if not np.all(hit):
        bad = int(np.flatnonzero(~hit)[0])
        raise OnnxAdmmError(
            f"encode_from_values: value {values[bad]!r} (element {int(stored_idx[bad])}) is not on "
            f"codebook row {int(g[bad])}"
        )
    codes = order[j] - g * k

    if compact:
        used = np.zeros(cb.shape, dtype=bool)
        used[g, codes] = True
        counts = used.sum(axis=1)
        k_new = max(1, int(counts.max()) if counts.size else 1)
        new_cb = np.empty((groups, k_new), dtype=np.float32)
        remap = np.full(cb.shape, -1, dtype=np.int64)
        for row in range(groups):
            kept = np.flatnonzero(used[row])
            if kept.size == 0:
                kept = np.array([0])
            kept = kept[np.argsort(cb[row, kept], kind="stable")]
            remap[row, kept] = np.arange(kept.size)
            new_cb[row, : kept.size] = cb[row, kept]
            new_cb[row, kept.size :] = cb[row, kept[-1]]
        codes = remap[g, codes]
        cb = new_cb
    need = max(1, math.ceil(math.log2(cb.shape[1])))
    if bits is None:
        bits = need
    elif bits < need:
        raise OnnxAdmmError(f"encode_from_values: {cb.shape[1]} levels need {need} bits, not {bits}")
    enc = Encoded(w.shape, w.dtype, codes.astype(np.uint8), int(bits), cb, group_axis, positions)
    enc.validate()
    return enc


def encode_sparse(w: np.ndarray) -> Encoded:
    """The raw sparse form (format 5) of a float weight: its non-zero values and their positions.
    A ``-0.0`` is a zero like ``+0.0`` (not stored; it decodes to ``+0.0``): masked pruning leaves
    many, and their sign changes no product or sum other than the sign of an exact zero."""
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float16):
        raise OnnxAdmmError(f"encode_sparse: weight must be float32 or float16, not {w.dtype}")
    positions = np.flatnonzero(w.reshape(-1))
    values = w.reshape(-1)[positions].astype(np.float32)
    enc = Encoded(w.shape, w.dtype, np.arange(positions.size), 0, values[None, :], None, positions)
    enc.validate()
    return enc


# --------------------------------------------------------------------------------------------------
# Bit packing (numpy side)


def _pack(values: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned ``values`` at ``width`` bits each (format 1 of the module docstring)."""
    values = np.asarray(values, dtype=np.uint32)
    if width == 8:
        return values.astype(np.uint8)
    if width == 16:
        return values.astype("<u2")
    n8 = -(-values.size // 8)
    padded = np.zeros(n8 * 8, dtype=np.uint32)
    padded[: values.size] = values
    out = np.empty(n8 * width, dtype=np.uint8)
    chunk = 1 << 20  # bounded temporary memory for big tensors (chunks are multiples of 8 values)
    for start in range(0, padded.size, chunk):
        part = padded[start : start + chunk]
        bitplanes = ((part[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
        out[start // 8 * width : (start + part.size) // 8 * width] = np.packbits(
            bitplanes.reshape(-1), bitorder="little"
        )
    return out


def _unpack(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack` (a numpy reference for tests)."""
    if width in (8, 16):
        return np.asarray(data).astype(np.int64)[:count]
    bitstream = np.unpackbits(np.asarray(data, dtype=np.uint8), bitorder="little")
    bitplanes = bitstream[: count * width].reshape(count, width).astype(np.int64)
    return bitplanes @ (1 << np.arange(width, dtype=np.int64))


def _packed_nbytes(count: int, width: int) -> int:
    if width in (8, 16):
        return count * width // 8
    return -(-count // 8) * width


# --------------------------------------------------------------------------------------------------
# Relative positions


def _skips(positions: np.ndarray) -> np.ndarray:
    """Zeros skipped before each stored element (the first counts from position -1)."""
    return np.diff(positions.astype(np.int64), prepend=-1) - 1


def _distances(positions: np.ndarray) -> np.ndarray:
    """Distance of each stored element from the previous one (the first from position 0)."""
    return np.diff(positions.astype(np.int64), prepend=0)


def _filler_advance(r: int, marked: bool) -> int:
    """Positions a filler advances: ``2**r - 1``, or one less when the gap value marks it."""
    return 2**r - 1 - int(marked)


def _filler_count(dist: np.ndarray, r: int, marked: bool) -> int:
    step = _filler_advance(r, marked)
    return int(((np.maximum(dist, 1) - 1) // step).sum())


def _entries(enc: Encoded, r: int, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The gap and code streams at ``r`` gap bits with fillers for ``mode``, and the filler count.

    See the module docstring (format 4). Fillers carry the gap value ``2**r - 1``; in the
    ``marker`` mode they advance one position less and carry code 0 (the decoder discards it),
    else they carry the code of a zero of their group (``zero``: the row's 0, ``append``: code K).
    """
    dist = _distances(enc.positions)
    marked = mode == "marker"
    step = _filler_advance(r, marked)
    nfill = (np.maximum(dist, 1) - 1) // step
    total = int(nfill.sum())
    if total == 0:
        return dist, enc.codes.astype(np.int64), 0
    gaps = np.full(dist.size + total, 2**r - 1, dtype=np.int64)
    codes = np.zeros(dist.size + total, dtype=np.int64)
    real_at = np.cumsum(nfill + 1) - 1  # stream index of each stored element, after its fillers
    gaps[real_at] = dist - nfill * step
    codes[real_at] = enc.codes
    if enc.raw:
        codes[:] = -1  # the decoder's value stream holds a 0 for every filler (format 5)
        codes[real_at] = enc.codes
    elif not marked:
        advance = np.full(gaps.size, step, dtype=np.int64)
        advance[real_at] = gaps[real_at]
        filler = np.ones(gaps.size, dtype=bool)
        filler[real_at] = False
        filler_pos = np.cumsum(advance)[filler]
        codes[filler] = _zero_codes(enc, mode)[enc.group_index(filler_pos)]
    return gaps, codes, total


def _zero_codes(enc: Encoded, mode: str) -> np.ndarray:
    """Per group, a code whose value is 0 (``zero``: the row's first 0; ``append``: K)."""
    if mode == "append":
        return np.full(enc.groups, enc.levels, dtype=np.int64)
    return np.argmax(enc.codebook == 0, axis=1)


def _filler_modes(enc: Encoded) -> list[str]:
    """How fillers can get a zero value: an existing 0 in every row, an appended code, or a marker
    (raw values: a 0 in the value stream, ``zero``)."""
    if enc.raw or np.all(np.any(enc.codebook == 0, axis=1)):
        return ["zero"]
    return (["append"] if enc.levels < 2**enc.bits else []) + ["marker"]


# --------------------------------------------------------------------------------------------------
# Graph building


_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.uint16): TensorProto.UINT16,
}

# A constant is stored narrower (and widened by a Cast node) only when that saves more bytes than
# the extra node costs in the file.
_NARROW_MIN_SAVING = 256


def _framed(size: int) -> int:
    """Bytes of a length-delimited protobuf field holding a message of ``size`` bytes."""
    return 1 + len(_varint(size)) + size


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _varints_nbytes(values) -> int:
    """Bytes of ``values`` as packed protobuf varints (a negative number takes 10: two's complement)."""
    v = np.asarray(values).astype(np.int64).view(np.uint64).reshape(-1)
    return int(v.size + sum(int(np.count_nonzero(v >> np.uint64(7 * k))) for k in range(1, 10)))


# TensorProto fields of integer types stored as varints: int32_data (sign-extended), int64_data,
# uint64_data
_VARINT_FIELD = {
    **{t: "int32_data" for t in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                                 TensorProto.UINT16, TensorProto.INT32, TensorProto.BOOL)},
    TensorProto.INT64: "int64_data",
    TensorProto.UINT32: "uint64_data",
    TensorProto.UINT64: "uint64_data",
}


# float16/bfloat16 values in typed fields: their bit patterns as int32_data varints
_HALF_FIELD = {TensorProto.FLOAT16: "int32_data", TensorProto.BFLOAT16: "int32_data"}


def compact_tensor(array: np.ndarray, name: str) -> TensorProto:
    """``array`` as a TensorProto in the smaller of its two encodings: raw bytes, or (integers)
    the typed field's packed varints, where a small number takes one byte whatever its dtype."""
    array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-D)
    raw = numpy_helper.from_array(array, name)
    dt = raw.data_type
    if dt not in _VARINT_FIELD or _varints_nbytes(array) >= array.nbytes:
        return raw
    out = TensorProto(name=name, data_type=dt, dims=array.shape)
    getattr(out, _VARINT_FIELD[dt]).extend(array.reshape(-1).astype(np.int64 if dt != TensorProto.UINT64 else np.uint64).tolist())
    return out


class _Builder:
    """Collects the initializers and nodes of one weight's decoder.

    Nodes and the tensors they make get short names ``<tag><i>`` (a node and its output share the
    name: node and tensor names are separate namespaces), the payload tensors
    ``<tag>{codes,gaps,entries,codebook,values}``, with a tag such as ``_A`` that no other name
    in the model starts with: every name is repeated in the file, once per producer and consumer,
    and long names would cost more than the payload of a small tensor. Integer constants are
    de-duplicated by value. ``initializers`` maps name to (role, TensorProto); the role is
    ``codes``/``positions``/``codebook`` for the payload and ``graph`` for the decoder's constants.
    """

    def __init__(self, opset: int, tag: str = "_A"):
        self.tag = tag
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, tuple[str, TensorProto]] = {}
        self._consts: dict[tuple, str] = {}
        self._count = 0
        self.joint: tuple[int, int] | None = None  # (bits, gap_bits) of a joint entry stream

    def _name(self) -> str:
        self._count += 1
        return self.tag + _base62(self._count)

    def payload(self, role_name: str, array: np.ndarray) -> str:
        name = self.tag + role_name
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.initializers[name] = (_ROLE_OF[role_name], tensor)
        return name

    def const(self, values, dtype) -> str:
        """An integer constant of ``dtype`` (de-duplicated; as varints where smaller; narrowed when
        that pays, see above)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._name()
            store = compact_tensor(arr, name)
            for small in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
                info = np.iinfo(small)
                if arr.size and arr.min() >= info.min and arr.max() <= info.max:
                    if _tensor_nbytes(store) - arr.size * info.bits // 8 > _NARROW_MIN_SAVING:
                        store = numpy_helper.from_array(arr.astype(small), name)
                    break
            self.initializers[name] = ("graph", store)
            if store.data_type != _NP_TO_ONNX[arr.dtype]:
                name = self.op("Cast", [name], to=_NP_TO_ONNX[arr.dtype])
            self._consts[key] = name
        return self._consts[key]

    def i32(self, values) -> str:
        return self.const(values, np.int32)

    def i64(self, values) -> str:
        return self.const(values, np.int64)

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        value = self._name()
        self.nodes.append(helper.make_node(op_type, inputs, [output or value], name=value, **attrs))
        return output or value

    def mod_pow2(self, x: str, width: int) -> str:
        """``x mod 2**width`` for non-negative int32 ``x`` (Mod needs opset 10)."""
        if self.opset >= 10:
            return self.op("Mod", [x, self.i32(2**width)])
        high = self.op("Mul", [self.op("Div", [x, self.i32(2**width)]), self.i32(2**width)])
        return self.op("Sub", [x, high])

    def slice_head(self, x: str, count: int) -> str:
        """The first ``count`` elements of 1-D ``x`` (Slice takes inputs from opset 10)."""
        if self.opset >= 10:
            return self.op("Slice", [x, self.i64([0]), self.i64([count])])
        return self.op("Slice", [x], starts=[0], ends=[count], axes=[0])

    def bytes_by_role(self) -> dict[str, int]:
        """Raw data bytes per role, ``total``, and ``nodes``: everything else the decoder adds."""
        out = {"codes": 0, "positions": 0, "codebook": 0, "graph": 0}
        headers = 0
        for role, t in self.initializers.values():
            n = _tensor_nbytes(t)
            if role == "entries":
                codes, positions = _split_entries(n, *self.joint)
                out["codes"] += codes
                out["positions"] += positions
            else:
                out[role] += n
            headers += _framed(t.ByteSize()) - n
        out["total"] = sum(out.values())
        out["nodes"] = headers + sum(_framed(n.ByteSize()) for n in self.nodes)
        return out


def _group_layout(width: int) -> tuple[list[list[int]], list[int]]:
    """For 8 values of ``width`` bits in ``width`` bytes: the bytes each value touches, its shift."""
    lo = [j * width // 8 for j in range(8)]
    hi = [(j * width + width - 1) // 8 for j in range(8)]
    nb = max(h - low + 1 for low, h in zip(lo, hi))
    idx = [[min(lo[j] + k, width - 1) for k in range(nb)] for j in range(8)]
    return idx, [j * width % 8 for j in range(8)]


def _emit_unpack(
    b: _Builder,
    role_name: str,
    values: np.ndarray | None,
    width: int,
    count: int,
    packed: bool,
    shape: tuple[int, ...] | None = None,
) -> str:
    """Emit a stream's payload and the nodes turning it back into ``count`` int32 values.

    The result has ``shape`` (default ``[count]``). Plain streams are a uint8/uint16 tensor of that
    shape, Cast to int32. Packed streams are a ``[rows, width]`` uint8 matrix (8 values per row):
    Cast to int32, Gather the bytes each value touches (``[rows, 8, nb]``), MatMul by ``256**k``
    to join them, Div by the value's bit offset, Mod ``2**width``, then Reshape (and Slice off the
    padding). ``values`` None builds the constants only (to price a layout).
    """
    shape = (count,) if shape is None else tuple(shape)
    if not packed or width in (8, 16):
        dtype = np.uint8 if width <= 8 else np.dtype("<u2")
        data = np.zeros(0, dtype) if values is None else values.astype(dtype).reshape(shape)
        return b.op("Cast", [b.payload(role_name, data)], to=TensorProto.INT32)
    rows = -(-count // 8)
    data = np.zeros((0, width), np.uint8) if values is None else _pack(values, width).reshape(rows, width)
    x = b.op("Cast", [b.payload(role_name, data)], to=TensorProto.INT32)
    byte_idx, shifts = _group_layout(width)
    if len(byte_idx[0]) == 1:
        x = b.op("Gather", [x, b.i32([i[0] for i in byte_idx])], axis=1)
    else:
        x = b.op("Gather", [x, b.i32(byte_idx)], axis=1)
        weights = b.i32([256**k for k in range(len(byte_idx[0]))])
        if b.opset >= 9:  # MatMul on int32 needs MatMul-9
            x = b.op("MatMul", [x, weights])
        else:
            x = b.op("ReduceSum", [b.op("Mul", [x, weights])], axes=[2], keepdims=0)
    if any(shifts):
        x = b.op("Div", [x, b.i32([2**s for s in shifts])])
    if any(s + width < 8 * len(byte_idx[0]) for s in shifts):
        x = b.mod_pow2(x, width)
    if rows * 8 == count:
        return b.op("Reshape", [x, b.i64(list(shape))])
    x = b.slice_head(b.op("Reshape", [x, b.i64([rows * 8])]), count)
    return x if len(shape) == 1 else b.op("Reshape", [x, b.i64(list(shape))])


@dataclass
class _Layout:
    """How one Encoded is written: code and gap streams (packed or not), gap width, fillers."""

    codes_packed: bool
    gap_bits: int = 0
    gaps_packed: bool = False
    fillers: int = 0
    filler_mode: str = "none"  # none | zero | append | marker (see _entries)
    joint: bool = False  # codes and gaps in one stream of bits + gap_bits (format 6)


def _unpack_overhead(width: int, count: int, opset: int) -> int:
    b = _Builder(opset)
    _emit_unpack(b, "codes", None, width, count, True, (count,))
    sizes = b.bytes_by_role()
    return sizes["graph"] + sizes["nodes"]


_PACKING = ("auto", "bits", "bytes")


def _stream_choice(width: int, count: int, opset: int, packing: str) -> tuple[bool, int]:
    """(packed?, bytes incl. decoder) of the way to store ``count`` values of ``width`` bits.

    ``packing`` "bits" always packs, "bytes" never does, "auto" picks the cheaper.
    """
    plain = count * (1 if width <= 8 else 2)
    if width in (8, 16) or count == 0 or packing == "bytes":
        return False, plain
    packed = _packed_nbytes(count, width) + _unpack_overhead(width, count, opset)
    return (True, packed) if packed < plain or packing == "bits" else (False, plain)


def _split_overhead(gap_bits: int, opset: int) -> int:
    """Bytes splitting a joint entry stream adds to a decoder (Mod, Div and their constant)."""
    b = _Builder(opset)
    b.op("Mod", ["_A1", b.i32(2**gap_bits)])
    b.op("Div", ["_A1", b.i32(2**gap_bits)])
    sizes = b.bytes_by_role()
    return sizes["graph"] + sizes["nodes"]


def _marker_overhead(opset: int) -> int:
    """Bytes the ``marker`` filler mode adds to a decoder (nodes, constants, codebook zero)."""
    b = _Builder(opset)
    is_filler = b.op("Equal", ["_A1", b.i32(255)])
    b.op("Sub", ["_A1", b.op("Cast", [is_filler], to=TensorProto.INT32)])
    b.op("Where", [is_filler, b.i32(1000), "_A2"])
    sizes = b.bytes_by_role()
    return sizes["graph"] + sizes["nodes"] + 4


def _plan(enc: Encoded, opset: int, packing: str = "auto") -> _Layout:
    """The layout with the fewest bytes: gap width 1..16, filler mode, plain-or-packed streams."""
    if packing not in _PACKING:
        raise OnnxAdmmError(f"packing must be one of {', '.join(_PACKING)}, not {packing!r}")
    if not enc.sparse or enc.stored == 0:
        return _Layout(_stream_choice(enc.bits, enc.stored, opset, packing)[0])
    dist = _distances(enc.positions)
    modes = _filler_modes(enc)
    extra = {
        "none": 0,
        "zero": 0,
        "append": enc.groups * _codebook_array(enc).itemsize,
        "marker": _marker_overhead(opset),
    }
    best = None
    for r in range(1, _MAX_GAP_BITS + 1):
        for mode in modes:
            if mode == "marker" and r == 1:
                continue  # a marked filler advances 2**r - 2 positions
            fillers = _filler_count(dist, r, mode == "marker")
            if not fillers:
                mode = "none"
            entries = enc.stored + fillers
            if enc.raw:
                codes_packed, code_bytes = False, entries * _codebook_array(enc).itemsize
            else:
                codes_packed, code_bytes = _stream_choice(enc.bits, entries, opset, packing)
            gaps_packed, gap_bytes = _stream_choice(r, entries, opset, packing)
            options = [(code_bytes + gap_bytes, _Layout(codes_packed, r, gaps_packed, fillers, mode))]
            if not enc.raw and enc.bits + r <= _MAX_GAP_BITS:
                packed, nbytes = _stream_choice(enc.bits + r, entries, opset, packing)
                cost = nbytes + _split_overhead(r, opset)
                options.append((cost, _Layout(packed, r, packed, fillers, mode, joint=True)))
            for cost, layout in options:
                cost += extra[mode]
                if best is None or cost < best[0]:
                    best = (cost, layout)
    return best[1]


def _codebook_array(enc: Encoded, mode: str = "none") -> np.ndarray:
    """Flat codebook as stored: float16 when the weight is float16 or float16 is exact.

    The ``append`` filler mode adds a zero column (code K of every row), ``marker`` one zero at
    the end (the entry fillers read).
    """
    table = enc.codebook
    if mode == "append":
        table = np.concatenate([table, np.zeros((enc.groups, 1), np.float32)], axis=1)
    flat = table.reshape(-1)
    if mode == "marker":
        flat = np.append(flat, np.float32(0))
    return _stored_floats(flat, enc.dtype)


def _stored_floats(flat: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 ``flat`` as stored for a weight of ``dtype``: float16 when the weight is float16 or
    every value is exact in float16, else float32."""
    if dtype == np.float16:
        return flat.astype(np.float16)
    with np.errstate(over="ignore"):
        half = flat.astype(np.float16)
    exact = np.array_equal(half.astype(np.float32), flat, equal_nan=True)
    return half if exact else flat


def _needed_opset(enc: Encoded) -> int:
    return _SPARSE_OPSET if enc.sparse else _DENSE_OPSET


def _build(
    enc: Encoded, weight: str, opset: int, tag: str = "_A", packing: str = "auto"
) -> tuple[_Builder, _Layout]:
    """The decoder of ``enc`` whose final output is named ``weight``, and its layout."""
    enc.validate()
    if opset < _needed_opset(enc):
        kind = "sparse" if enc.sparse else "dense"
        raise OnnxAdmmError(
            f"{weight!r}: the {kind} decoder needs opset >= {_needed_opset(enc)}, not {opset}"
        )
    layout = _plan(enc, opset, packing)
    b = _Builder(opset, tag)
    zero = numpy_helper.from_array(np.zeros(1, enc.dtype))
    if enc.sparse and enc.stored == 0:
        b.op("ConstantOfShape", [b.i64(list(enc.shape))], weight, value=zero)
        return b, layout

    k, groups = enc.levels, enc.groups
    inner = 1 if enc.group_axis is None else math.prod(enc.shape[enc.group_axis + 1 :])
    cb_arr = _codebook_array(enc)
    if not enc.sparse:
        idx = _emit_unpack(b, "codes", enc.codes, enc.bits, enc.stored, layout.codes_packed, enc.shape)
        if groups > 1:  # add K * (index along group_axis), broadcast from shape [G, 1, ..., 1]
            if opset >= 11:
                offsets = b.op("Range", [b.i32(0), b.i32(groups * k), b.i32(k)])
            else:
                offsets = b.i32(np.arange(groups) * k)
            trailing = len(enc.shape) - enc.group_axis - 1
            if trailing:
                offsets = b.op("Reshape", [offsets, b.i64([groups] + [1] * trailing)])
            idx = b.op("Add", [idx, offsets])
    else:
        mode, r = layout.filler_mode, layout.gap_bits
        gaps, codes, fillers = _entries(enc, r, mode)
        assert fillers == layout.fillers
        cb_arr = _codebook_array(enc, mode)
        if enc.raw:
            stream = np.zeros(codes.size, np.float32)
            stream[codes >= 0] = enc.codebook[0]
            cb_arr = stream.astype(cb_arr.dtype)
        if layout.joint:  # format 6: code * 2**r + gap in one stream
            b.joint = (enc.bits, r)
            merged = _emit_unpack(b, "entries", codes * 2**r + gaps, enc.bits + r, codes.size, layout.codes_packed)
            dist = b.op("Mod", [merged, b.i32(2**r)])
            idx = b.op("Div", [merged, b.i32(2**r)])
        else:
            if not enc.raw:
                idx = _emit_unpack(b, "codes", codes, enc.bits, codes.size, layout.codes_packed)
            dist = _emit_unpack(b, "gaps", gaps, r, gaps.size, layout.gaps_packed)
        if mode == "marker":  # a filler advances one position less than its gap value says
            is_filler = b.op("Equal", [dist, b.i32(2**r - 1)])
            dist = b.op("Sub", [dist, b.op("Cast", [is_filler], to=TensorProto.INT32)])
        pos = b.op("CumSum", [dist, b.i32(0)])
        if groups > 1:
            g = b.op("Div", [pos, b.i32(inner)]) if inner > 1 else pos
            if enc.group_axis > 0:
                g = b.op("Mod", [g, b.i32(groups)])
            stride = k + 1 if mode == "append" else k
            idx = b.op("Add", [idx, b.op("Mul", [g, b.i32(stride)])])
        if mode == "marker":  # fillers read the zero at the end of the codebook
            idx = b.op("Where", [is_filler, b.i32(cb_arr.size - 1), idx])
    cast = cb_arr.dtype != enc.dtype
    last = not enc.sparse and not cast  # this node outputs the weight
    if enc.raw:
        values = b.payload("values", cb_arr)
    else:
        values = b.op("Gather", [b.payload("codebook", cb_arr), idx], weight if last else None, axis=0)
    if cast:
        values = b.op("Cast", [values], None if enc.sparse else weight, to=_NP_TO_ONNX[enc.dtype])
    if enc.sparse:
        zeros = b.op("ConstantOfShape", [b.i64([enc.size])], value=zero)
        values = b.op("ScatterElements", [zeros, pos, values], axis=0)
        b.op("Reshape", [values, b.i64(list(enc.shape))], weight)
    return b, layout


# --------------------------------------------------------------------------------------------------
# Byte accounting


def _describe(enc: Encoded, layout: _Layout, tag: str) -> dict:
    """The weight's entry in the ``METADATA_KEY`` metadata."""
    return {
        "format": FORMAT,
        "tag": tag,
        "shape": list(enc.shape),
        "bits": enc.value_bits,
        "raw": enc.raw,
        "K": 0 if enc.raw else enc.levels,
        "groups": enc.groups,
        "group_axis": enc.group_axis,
        "sparse": enc.sparse,
        "gap_bits": layout.gap_bits,
        "stored": enc.stored,
        "fillers": layout.fillers,
        "filler_mode": layout.filler_mode,
        "joint": layout.joint,
        "nonzero": _nonzero(enc),
    }


def file_cost(enc: Encoded, name: str, opset: int = 13, packing: str = "auto") -> int:
    """Bytes that storing ``enc`` for the weight ``name`` adds to a file: the decoder's data, nodes
    and tensor names as :func:`apply_storage` writes them (node names repeat ``name``), plus the
    weight's metadata entry (with the framing of the metadata property itself, which several packed
    weights share: a conservative price for each)."""
    b, layout = _build(enc, name, max(opset, _needed_opset(enc)), packing=packing)
    sizes = b.bytes_by_role()
    entry = json.dumps({name: _describe(enc, layout, "_A")}, sort_keys=True, separators=(",", ":"))
    return sizes["total"] + sizes["nodes"] + len(entry.encode()) + len(METADATA_KEY) + 8


def _tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's data as stored: raw, external, or typed integer fields' varints; other
    typed fields counted at item size."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == TensorProto.EXTERNAL:
        info = {kv.key: kv.value for kv in t.external_data}
        if "length" in info:
            return int(info["length"])
    field = _VARINT_FIELD.get(t.data_type) or _HALF_FIELD.get(t.data_type)
    if field is not None and len(getattr(t, field)):
        values = np.array(getattr(t, field), dtype=np.uint64 if field == "uint64_data" else np.int64)
        return _varints_nbytes(values.view(np.int64))
    n = math.prod(t.dims)
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return -(-n // 2)
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def storage_bytes(enc: Encoded, opset: int = 13, packing: str = "auto") -> dict:
    """Bytes :func:`apply_storage` writes for ``enc``.

    Keys: ``codes`` (code stream, fillers' codes included), ``positions`` (gap stream, 0 for dense),
    ``codebook``, ``graph`` (the decoder's shape/index constants), ``total`` (the sum: the raw data
    of every initializer the decoder adds) and ``nodes`` (not in ``total``: the serialized nodes and
    the initializers' names, dims and protobuf framing, so ``total + nodes`` is what the decoder adds
    to the file; names are assumed as short as those of :func:`apply_storage` for a weight named
    ``w``). ``opset`` and ``packing`` as given to :func:`apply_storage` (the opset after it);
    below opset 10/11 the dense decoder uses slightly different constants.
    """
    return _build(enc, "w", max(opset, _needed_opset(enc)), packing=packing)[0].bytes_by_role()


def theoretical(enc: Encoded, gap_bits: int | None = None) -> dict:
    """Storage in bits as Deep Compression (and the ADMM papers) count it.

    Encoding assumed: dense tensors store ``size * bits`` bits of codes. Sparse tensors store one
    entry per stored element plus one per *filler zero*; each entry holds a ``bits``-bit code and an
    ``r``-bit relative index (``r = gap_bits``): the distance ``d`` (1..2**r) to the previous entry,
    the first counting from position -1. A filler zero is inserted ``2**r`` positions after the
    previous entry whenever the next element is farther, so an element after ``s`` zeros needs
    ``s // 2**r`` fillers. Codebooks cost ``G * K * 32`` bits. No decoder, alignment or container
    overhead is counted. ``gap_bits`` None picks the ``r`` in 1..16 with the smallest total. The raw
    form (format 5) counts each entry's float value (32 or 16 bits) under ``codes`` and no codebook.

    The file format (module docstring, format 4) differs slightly: its distances run 1..2**r - 1,
    so a filler covers ``2**r - 1`` positions (``2**r - 2`` in the ``marker`` mode), and a filler's
    zero may cost a codebook entry or a few nodes instead; :func:`storage_bytes` gives its bytes.

    Returns ``gap_bits``, ``fillers``, ``entries`` (stored + fillers), ``bits`` with keys
    ``codes``/``positions``/``codebook``/``total``, and the same in ``bytes`` (bits / 8, float).
    """
    enc.validate()
    codebook_bits = 0 if enc.raw else enc.groups * enc.levels * 32
    skips = _skips(enc.positions) if enc.sparse else None

    def count(r: int) -> dict:
        fillers = int((skips // 2**r).sum()) if enc.sparse else 0
        entries = enc.stored + fillers
        bits = {"codes": entries * enc.value_bits, "positions": entries * r, "codebook": codebook_bits}
        bits["total"] = sum(bits.values())
        return {
            "gap_bits": r,
            "fillers": fillers,
            "entries": entries,
            "bits": bits,
            "bytes": {key: val / 8 for key, val in bits.items()},
        }

    if not enc.sparse:
        return count(0)
    if gap_bits is not None:
        return count(int(gap_bits))
    return min((count(r) for r in range(1, _MAX_GAP_BITS + 1)), key=lambda c: c["bits"]["total"])


# --------------------------------------------------------------------------------------------------
# Model rewriting


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version (0 without one)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _read_meta(model: onnx.ModelProto, warn: bool = False) -> dict:
    """The ``METADATA_KEY`` entry of ``model`` ({} when absent or unreadable)."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                if warn:
                    log.warning("ignoring unreadable %s metadata", METADATA_KEY)
                return {}
    return {}


def _write_meta(model: onnx.ModelProto, meta: dict) -> None:
    """Replace ``model``'s ``METADATA_KEY`` entry by ``meta`` (removed when empty), in place."""
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if meta:
        model.metadata_props.add(
            key=METADATA_KEY, value=json.dumps(meta, sort_keys=True, separators=(",", ":"))
        )


def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _iter_nodes(g)


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _subgraphs(g)


def _names_in(graph: onnx.GraphProto) -> set[str]:
    """Every name used in ``graph`` and its subgraphs (tensors, nodes, inputs, outputs, value infos):
    a new name must differ from all of them, since a subgraph sees the names of its outer graphs."""
    names: set[str] = set()
    for g in _subgraphs(graph):
        names |= {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
        names |= {v.name for v in (*g.input, *g.output, *g.value_info)}
        names |= {n.name for n in g.node} | {o for n in g.node for o in n.output}
    return names


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` with its default-domain opset raised to ``target`` (see the module docstring)."""
    old = default_opset(model)
    changed = set()
    for node in _iter_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            before = onnx.defs.get_schema(node.op_type, old, "").since_version if old else -1
            after = onnx.defs.get_schema(node.op_type, target, "").since_version
        except onnx.defs.SchemaError:
            changed.add(node.op_type)
            continue
        if before != after:
            changed.add(node.op_type)
    if changed:
        log.info(
            "raising opset %d -> %d with onnx.version_converter (%s change)",
            old,
            target,
            ", ".join(sorted(changed)),
        )
        # the converter does not know sparse initializers ("input ... is undefined"): it sees them as
        # graph inputs of their type and shape, and they are put back afterwards
        sparse = list(model.graph.sparse_initializer)
        names = {sp.values.name for sp in sparse}
        if sparse:
            del model.graph.sparse_initializer[:]
            model.graph.input.extend(
                helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims))
                for sp in sparse
            )
        try:
            model = onnx.version_converter.convert_version(model, target)
            if sparse:
                kept = [v for v in model.graph.input if v.name not in names]
                del model.graph.input[:]
                model.graph.input.extend(kept)
                model.graph.sparse_initializer.extend(sparse)
        except Exception as exc:
            raise OnnxAdmmError(
                f"the decoders need opset {target} but the model is at opset {old} and "
                f"onnx.version_converter cannot convert it ({', '.join(sorted(changed))} change): "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
    else:
        found = False
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version, found = target, True
        if not found:
            model.opset_import.append(helper.make_opsetid("", target))
    min_ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < min_ir:
        if model.ir_version < 4:
            # below IR 4 onnxruntime treats initializers listed as inputs as constants; keep that
            inits = {t.name for t in model.graph.initializer}
            kept = [i for i in model.graph.input if i.name not in inits]
            del model.graph.input[:]
            model.graph.input.extend(kept)
        model.ir_version = min_ir
    return model


_TAG_LETTERS = string.ascii_uppercase + string.ascii_lowercase[:-1]  # "z" escapes to longer tags
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def _base62(n: int) -> str:
    out = ""
    while True:
        n, d = divmod(n, 62)
        out = _BASE62[d] + out
        if not n:
            return out


def _free_tags(taken: set[str]) -> Iterator[str]:
    """Short name prefixes that no name in ``taken`` starts with: ``_A`` .. ``_y``, then ``_zA`` ..
    ``_zy``, ``_zzA``, ... No tag is a prefix of another (each ends at its first letter other than
    ``z``), so the names ``<tag><base-62 count>`` of two decoders never share a tag."""
    prefixes: dict[int, set[str]] = {}
    for depth in itertools.count():
        for c in _TAG_LETTERS:
            tag = "_" + "z" * depth + c
            if len(tag) not in prefixes:
                prefixes[len(tag)] = {n[: len(tag)] for n in taken}
            if tag not in prefixes[len(tag)]:
                yield tag


def select_storage(
    encodings: Mapping[str, Encoded],
    opset: int,
    packing: str = "auto",
    plain: Mapping[str, int] | None = None,
    bundle: bool | str = True,
) -> tuple[list[list[str]], list[str]]:
    """How to store ``encodings`` in the fewest bytes: ``(bundles, singles)``, lists of weight names.

    A weight goes into a shared bundle (:mod:`onnxadmm.export.bundle`, one decoder for several
    weights; needs ``opset`` >= 11 and ``bundle``), gets its own decoder (a single), or, where
    ``plain`` gives the bytes of leaving it as it is and that is cheaper, into neither. Bundles are
    grouped by dtype; members whose removal makes the file smaller are taken out, one at a time.
    ``bundle="always"`` puts every weight that can be in a bundle into one (per dtype), for tests.
    """
    from . import bundle as bd

    plain = dict(plain or {})
    single = {n: file_cost(e, n, opset, packing) for n, e in encodings.items()}
    alt = {n: min(single[n], plain.get(n, single[n])) for n in encodings}
    groups: dict[str, list] = {}
    if bundle and opset >= bd.OPSET:
        for n, e in encodings.items():
            m = bd.member(n, e)
            if m is not None:
                groups.setdefault(bd.bundle_key(m), []).append(m)
    bundles = []
    in_bundle: set[str] = set()

    def cost(members, plans=1) -> float:
        if not members:
            return 0
        try:
            return bd.build(members, opset, plans=plans)[2]
        except OnnxAdmmError:
            return math.inf

    for members in groups.values():
        if bd.too_big(members):
            continue  # too big for a bundle (see bundle.MAX_BITS): one decoder per weight
        if bundle == "always":
            bundles.append([m.name for m in members])
            in_bundle |= {m.name for m in members}
            continue
        kept = list(members)
        current = cost(kept)
        # take out, one at a time, the member whose removal saves most (small ones first, at most 8 tries)
        while len(kept) > 1:
            trials = sorted(kept, key=lambda m: m.size)[:8]
            best = None
            for m in trials:
                rest = [x for x in kept if x is not m]
                c = cost(rest) + alt[m.name] + sum(alt[x.name] for x in members if x not in kept)
                if best is None or c < best[0]:
                    best = (c, m)
            if best is None or best[0] >= current:
                break
            current = best[0]
            kept.remove(best[1])
        outside = sum(alt[m.name] for m in members)
        if kept and cost(kept, plans=4) + sum(alt[m.name] for m in members if m not in kept) < outside:
            bundles.append([m.name for m in kept])
            in_bundle |= {m.name for m in kept}
    singles = [n for n in encodings if n not in in_bundle and single[n] <= plain.get(n, single[n])]
    return bundles, singles


def apply_storage(
    model: onnx.ModelProto,
    encodings: Mapping[str, Encoded],
    opset_min: int | None = None,
    packing: str = "auto",
    bundle: bool | str = True,
    layout: tuple[list[list[str]], list[str]] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` where each weight named in ``encodings`` is stored as its :class:`Encoded`.

    Rules:

    1. The weight must be a float32/float16 initializer (or sparse initializer) of the main graph
       whose shape and dtype match the encoding; its data is dropped (the encoding defines the new
       values). A weight also listed in ``graph.input`` (old IR) is removed from the inputs.
    2. The decoder's nodes and tensors, named ``<tag><i>`` with a tag (``_A``, ``_B``, ..) unique to the
       weight or bundle (short names: they repeat in the file), go to the start of ``graph.node``
       and the last node outputs the weight's name, so every consumer and every other node,
       initializer and attribute is left untouched.
    3. The default-domain opset is raised when a decoder needs it (7 dense, 11 sparse) or to
       ``opset_min``; see the module docstring for how. IR < 4 models that keep their IR version
       also list the new initializers as graph inputs, as that IR requires.
    4. ``packing``: "bits" bit-packs every code and gap stream (widths other than 8 and 16),
       "bytes" stores them as uint8/uint16, "auto" (default) picks per stream whichever adds fewer
       bytes to the file, decoder nodes included (packing pays from a few hundred values on).
    5. ``bundle`` (default True): where the opset is (or becomes) 11 or more, weights share one
       decoder (:mod:`onnxadmm.export.bundle`) wherever that makes the file smaller
       (:func:`select_storage`; ``"always"``: all that can); raw values, per-channel codebooks and
       all-zero weights always get their own. ``layout``: the ``(bundles, singles)`` that
       :func:`select_storage` already chose for exactly these encodings (the opset is raised to 11
       for a bundle), instead of choosing again.
    6. ``metadata_props[METADATA_KEY]`` holds a JSON object (merged with an existing one): per
       weight with its own decoder ``{weight: description}`` with format, tag, shape, bits, K,
       groups, group_axis, sparse, gap_bits, stored, fillers, filler_mode, joint and nonzero
       (decoded non-zeros); per bundle ``{tag: entry}`` (see :mod:`onnxadmm.export.bundle`), for
       :func:`analyze`, :func:`decoder_nodes` and report tools.
    """
    from . import bundle as bd

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not encodings:
        return out
    for enc in encodings.values():
        enc.validate()
    if layout is not None and sorted([n for names in layout[0] for n in names] + list(layout[1])) != sorted(encodings):
        raise OnnxAdmmError("apply_storage: the layout must name every encoded weight once")
    target = max([opset_min or 0, default_opset(out)] + [_needed_opset(e) for e in encodings.values()])
    if layout is not None and layout[0]:
        target = max(target, bd.OPSET)
    if target > default_opset(out):
        out = raise_opset(out, target)
    graph = out.graph

    inits = {t.name: i for i, t in enumerate(graph.initializer)}
    sparse_inits = {s.values.name: i for i, s in enumerate(graph.sparse_initializer)}
    taken = _names_in(graph)
    tags = _free_tags(taken)
    drop_init, drop_sparse = set(), set()
    for name, enc in encodings.items():
        if name in inits:
            t = graph.initializer[inits[name]]
            dims, dtype, drop_init = tuple(t.dims), t.data_type, drop_init | {inits[name]}
        elif name in sparse_inits:
            s = graph.sparse_initializer[sparse_inits[name]]
            dims, dtype, drop_sparse = tuple(s.dims), s.values.data_type, drop_sparse | {sparse_inits[name]}
        else:
            raise OnnxAdmmError(f"apply_storage: {name!r} is not an initializer of the main graph")
        if dims != enc.shape or dtype != _NP_TO_ONNX[enc.dtype]:
            raise OnnxAdmmError(
                f"apply_storage: {name!r} is {helper.tensor_dtype_to_np_dtype(dtype)}{list(dims)}, "
                f"the encoding is {enc.dtype}{list(enc.shape)}"
            )
    bundles, singles = layout or select_storage(encodings, target, packing, bundle=bundle)
    builders = []
    described = {}
    for names in bundles:
        tag = next(tags)
        b, entry, _ = bd.build([bd.member(n, encodings[n]) for n in names], target, tag)
        builders.append(b)
        described[tag] = entry
    for name in singles:
        tag = next(tags)
        b, layout = _build(encodings[name], name, target, tag, packing)
        builders.append(b)
        described[name] = _describe(encodings[name], layout, tag)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    for b in builders:
        made = {o for n in b.nodes for o in n.output} - set(encodings)
        clash = taken & (made | set(b.initializers) | {n.name for n in b.nodes if n.name})
        if clash:
            raise OnnxAdmmError(f"apply_storage: the model already has a tensor named {min(clash)!r}")
        new_nodes.extend(b.nodes)
        new_inits.extend(t for _, t in b.initializers.values())

    kept = [t for i, t in enumerate(graph.initializer) if i not in drop_init]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    kept_sparse = [s for i, s in enumerate(graph.sparse_initializer) if i not in drop_sparse]
    del graph.sparse_initializer[:]
    graph.sparse_initializer.extend(kept_sparse)
    kept_inputs = [v for v in graph.input if v.name not in encodings]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    if out.ir_version < 4:  # IR 3 requires every initializer to be a graph input
        graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits
        )
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)

    _write_meta(out, {**_read_meta(out), **described})
    return out


# --------------------------------------------------------------------------------------------------
# Reading back


def _float_entry(name: str, kind: str, tensors: list[TensorProto], shape, values: np.ndarray) -> dict:
    """Entry of a weight stored as plain float data (``tensors``: values first, then indices)."""
    raw = [_tensor_nbytes(t) for t in tensors]
    headers = sum(_framed(t.ByteSize()) for t in tensors) - sum(raw)
    itembits = np.dtype(helper.tensor_dtype_to_np_dtype(tensors[0].data_type)).itemsize * 8
    parts = {"codes": raw[0], "positions": sum(raw[1:]), "codebook": 0, "graph": 0, "total": sum(raw)}
    parts["nodes"] = headers
    return {
        "name": name,
        "storage": kind,
        "shape": list(shape),
        "params": math.prod(shape),
        "nonzero": int(np.count_nonzero(values)),
        "bits": itembits,
        "stored": math.prod(tensors[0].dims),
        "bytes": parts,
    }


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _is_decoder_node(name: str, prefix: str) -> bool:
    rest = name[len(prefix) :]
    return name.startswith(prefix) and rest.isascii() and rest.isalnum()


def _node_prefix(weight: str, description: dict) -> str:
    """Node-name prefix of a weight's decoder: its tag, or the older ``onnxadmm_decode/<weight>/``."""
    return description.get("tag") or f"{PREFIX}{weight}/"


def _weights_meta(meta: dict) -> dict[str, dict]:
    """``{weight: description}`` of a metadata entry, bundles (``{tag: entry}``) expanded into the
    descriptions of their members."""
    from . import bundle as bd

    out = {}
    for key, d in meta.items():
        if _is_bundled(d):
            out.update(bd.expand_meta(key, d))
        else:
            out[key] = d
    return out


def _is_bundled(description) -> bool:
    """Whether a metadata entry is a bundle's (or a description of one of its members)."""
    from . import bundle as bd

    return isinstance(description, dict) and description.get("format") == bd.FORMAT


def _owned_nodes(graph: onnx.GraphProto, weight: str, description: dict) -> list[onnx.NodeProto]:
    """The decoder nodes of ``weight``: named by its tag, or for a bundle (unnamed nodes) every node
    reading or making a tensor named with the bundle's tag (the bundle's nodes, shared by its members)."""
    prefix = _node_prefix(weight, description)
    if _is_bundled(description):
        return [n for n in graph.node if any(x.startswith(prefix) for x in [*n.input, *n.output])]
    return [n for n in graph.node if _is_decoder_node(n.name, prefix)]


def decoder_nodes(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """``{weight: its decoder nodes}`` for every weight :func:`apply_storage` wrote (by the tags in
    the metadata entry; files from before tags were recorded, by their ``onnxadmm_decode/`` names).
    The members of a bundle share its nodes."""
    return {w: _owned_nodes(model.graph, w, d) for w, d in _weights_meta(_read_meta(model)).items()}


def _decoder_parts(
    graph: onnx.GraphProto, weight: str, description: dict
) -> tuple[list[onnx.NodeProto], dict[str, TensorProto]]:
    """The decoder nodes of ``weight`` and the initializers they read."""
    nodes = _owned_nodes(graph, weight, description)
    inputs = {i for n in nodes for i in n.input}
    return nodes, {t.name: t for t in graph.initializer if t.name in inputs}


def _apportion(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (equal parts when they are all 0), in integers
    that add up to ``total`` (largest remainders)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones(len(weights))
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    rest = int(total - out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return [int(x) for x in out]


def _codebook_entry(name: str, d: dict, parts: dict, **extra) -> dict:
    """analyze's entry of a weight written by :func:`apply_storage`, from its description ``d``."""
    return {
        "name": name,
        "storage": "codebook",
        "shape": d["shape"],
        "params": math.prod(d["shape"]),
        "nonzero": d["nonzero"],
        "bits": d["bits"],
        "raw": d.get("raw", False),
        "stored": d["stored"],
        "K": d["K"],
        "groups": d["groups"],
        "sparse": d["sparse"],
        "gap_bits": d["gap_bits"],
        "fillers": d["fillers"],
        **extra,
        "bytes": parts,
    }


def _bundle_entries(
    graph: onnx.GraphProto, tag: str, members: dict[str, dict]
) -> tuple[dict[str, dict], set[str]]:
    """analyze's entries of a bundle's members: its payload shared out by each member's code and
    position bits, each member's codebook, and the decoder's constants, nodes and headers in equal
    parts; and the names of the bundle's initializers."""
    names = list(members)
    nodes, inits = _decoder_parts(graph, names[0], members[names[0]])
    data = sum(_tensor_nbytes(t) for n, t in inits.items() if n == tag + "data")
    code_bits = [d["stored"] * d.get("code_bits", d["bits"]) for d in members.values()]
    pos_bits = [
        math.prod(d["shape"]) if d["region"] == "bitmap" else (d["stored"] + d["fillers"]) * d["gap_bits"]
        for d in members.values()
    ]
    split = _apportion(data, code_bits + pos_bits)
    book_names = {tag + "step"} | {n for n in inits if n.startswith(tag + "codebook")}
    graph_bytes = sum(_tensor_nbytes(t) for n, t in inits.items() if n != tag + "data" and n not in book_names)
    headers = sum(_framed(t.ByteSize()) - _tensor_nbytes(t) for t in inits.values())
    headers += sum(_framed(n.ByteSize()) for n in nodes)
    graph_share = _apportion(graph_bytes, [0] * len(names))
    node_share = _apportion(headers, [0] * len(names))
    if tag + "step" in inits:  # affine: one integer grid and a step per member, shared out equally
        grid_bytes = _tensor_nbytes(inits[tag + "codebook"]) + _tensor_nbytes(inits[tag + "step"])
        books = _apportion(grid_bytes, [1] * len(names))
    elif tag + "codebook" in inits:  # one table for all members, shared out by their K + 1 entries
        books = _apportion(_tensor_nbytes(inits[tag + "codebook"]), [d["K"] + 1 for d in members.values()])
    else:  # files of session 15: a table per member
        books = [_tensor_nbytes(inits[f"{tag}codebook{i}"]) if f"{tag}codebook{i}" in inits else 0 for i in range(len(names))]
    out = {}
    for i, (name, d) in enumerate(members.items()):
        parts = {
            "codes": split[i],
            "positions": split[len(names) + i],
            "codebook": books[i],
            "graph": graph_share[i],
        }
        parts["total"] = sum(parts.values())
        parts["nodes"] = node_share[i]
        out[name] = _codebook_entry(name, d, parts, region=d["region"], code_bits=d.get("code_bits", d["bits"]))
    return out, set(inits)


def analyze(model: onnx.ModelProto) -> dict[str, dict]:
    """Per-weight storage of a model: ``{name: {name, storage, shape, params, nonzero, bits, stored, bytes}}``.

    ``storage`` is ``codebook`` (written by :func:`apply_storage`, recognised by the metadata entry
    and its decoder nodes; the entry adds ``K``, ``groups``, ``sparse``,
    ``gap_bits`` and ``fillers``), ``dense`` (a float initializer), ``coo`` (a float sparse
    initializer: values under ``codes``, indices under ``positions``) or ``constant`` (a float
    ``Constant`` node tensor). ``bytes`` has the keys of :func:`storage_bytes`: ``total`` is the raw
    data the file holds for the weight, ``nodes`` the rest it costs (decoder nodes, tensor names and
    headers), so summing ``total + nodes`` over the result gives the weights' share of the file.
    Tensors in external data are counted by their ``length`` (or element count) and need not be
    loaded (their ``nonzero`` is then ``params``).
    """
    from . import bundle as bd

    graph = model.graph
    raw_meta = _read_meta(model, warn=True)
    result: dict[str, dict] = {}
    owned: set[str] = set()
    for tag, entry in raw_meta.items():
        if _is_bundled(entry):
            members = bd.expand_meta(tag, entry)
            if not _owned_nodes(graph, next(iter(members)), next(iter(members.values()))):
                log.warning("%s lists bundle %r but the model has no decoder for it", METADATA_KEY, tag)
                continue
            entries, inits = _bundle_entries(graph, tag, members)
            result.update(entries)
            owned |= inits
    meta = {k: d for k, d in raw_meta.items() if not _is_bundled(d)}
    for name, d in meta.items():
        nodes, inits = _decoder_parts(graph, name, d)
        if not nodes:
            log.warning("%s lists %r but the model has no decoder for it", METADATA_KEY, name)
            continue
        parts = {"codes": 0, "positions": 0, "codebook": 0, "graph": 0}
        headers = 0
        prefix = _node_prefix(name, d)
        for init_name, t in inits.items():
            n = _tensor_nbytes(t)
            role = _ROLE_OF.get(init_name[len(prefix) :] if init_name.startswith(prefix) else "", "graph")
            if role == "entries":
                codes, positions = _split_entries(n, d["bits"], d["gap_bits"])
                parts["codes"] += codes
                parts["positions"] += positions
            else:
                parts[role] += n
            headers += _framed(t.ByteSize()) - n
        owned |= set(inits)
        parts["total"] = sum(parts.values())
        parts["nodes"] = headers + sum(_framed(n.ByteSize()) for n in nodes)
        result[name] = _codebook_entry(name, d, parts)
    for t in graph.initializer:
        if t.name not in owned and t.data_type in _FLOATS:
            result[t.name] = _float_entry(t.name, "dense", [t], t.dims, _maybe_values(t))
    for s in graph.sparse_initializer:
        if s.values.data_type in _FLOATS:
            name = s.values.name
            result[name] = _float_entry(name, "coo", [s.values, s.indices], s.dims, _maybe_values(s.values))
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        for a in node.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _FLOATS:
                result[node.output[0]] = _float_entry(
                    node.output[0], "constant", [a.t], a.t.dims, _maybe_values(a.t)
                )
    return result


def expand_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose compact-stored weights (written by :func:`apply_storage`) are plain
    initializers again: each weight's decoder is run once by onnxruntime, its nodes and constants
    are removed and the decoded tensor takes the weight's name, so a compressed model can be
    imported and compressed further. The metadata entry goes; a model without one is returned as is."""
    raw_meta = _read_meta(model)
    meta = _weights_meta(raw_meta)
    parts = {name: _decoder_parts(model.graph, name, d) for name, d in meta.items()}
    parts = {name: v for name, v in parts.items() if v[0]}
    if not parts:
        return model
    import onnxruntime as ort

    nodes, seen = [], set()
    for v in parts.values():  # the members of a bundle share its nodes
        for n in v[0]:
            if id(n) not in seen:
                seen.add(id(n))
                nodes.append(n)
    inits = list({t.name: t for v in parts.values() for t in v[1].values()}.values())
    sub = helper.make_model(
        helper.make_graph(nodes, "decode", [], [], inits), opset_imports=list(model.opset_import)
    )
    sub.ir_version = max(model.ir_version, 7)
    inferred = onnx.shape_inference.infer_shapes(sub)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    sub.graph.output.extend(
        helper.make_tensor_value_info(n, types.get(n) or TensorProto.FLOAT, None) for n in parts
    )
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(parts, sess.run(list(parts), {})))

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    drop_nodes = {(n.name, tuple(n.output)) for n in nodes}
    drop_inits = {t.name for t in inits}
    kept = [n for n in g.node if (n.name, tuple(n.output)) not in drop_nodes]
    del g.node[:]
    g.node.extend(kept)
    kept_inits = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(kept_inits + [numpy_helper.from_array(v, n) for n, v in values.items()])
    if out.ir_version < 4:  # IR 3 lists every initializer as a graph input
        kept_inputs = [v for v in g.input if v.name not in drop_inits]
        del g.input[:]
        g.input.extend(kept_inputs)
        g.input.extend(
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in values.items()
        )
    left = {}
    for key, d in raw_meta.items():  # entries of weights not expanded (no decoder found) stay
        names = set(_weights_meta({key: d}))
        if not names & set(parts):
            left[key] = d
    _write_meta(out, left)
    return out


def _maybe_values(t: TensorProto) -> np.ndarray:
    """The tensor's values, or an array of ones (nonzero unknown) when its external data is not loaded."""
    if t.data_location == TensorProto.EXTERNAL:
        return np.ones(math.prod(t.dims), dtype=np.int8)
    return numpy_helper.to_array(t)


def unfolded_decode_nodes(
    model: onnx.ModelProto, providers: Iterable[str] = ("CPUExecutionProvider",)
) -> list[str]:
    """Decoder nodes onnxruntime leaves in the graph after basic optimisation (should be ``[]``).

    Loads ``model`` at ``ORT_ENABLE_BASIC`` with ``optimized_model_filepath`` set and lists the
    nodes of the optimised graph named as decoder nodes (see :func:`decoder_nodes`).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
        optimized = onnx.load(path, load_external_data=False)
    meta = _weights_meta(_read_meta(model))
    prefixes = [_node_prefix(w, d) for w, d in meta.items() if not _is_bundled(d)]
    tags = {d["tag"] for d in meta.values() if _is_bundled(d)}
    left = []
    for n in optimized.graph.node:
        if any(_is_decoder_node(n.name, p) for p in prefixes):
            left.append(n.name)
        elif any(x.startswith(t) for t in tags for x in [*n.input, *n.output]):
            left.append(n.name or f"{n.op_type}({', '.join(n.output)})")
    return left
