"""Several compressed weights decoded by one shared chain of ONNX ops (storage format 7, a *bundle*).

:mod:`onnxadmm.export.storage` gives every compressed weight its own decoder: a few hundred bytes of
nodes and constants each, and ~550 more for each bit-packed stream. In a small model that outweighs
the weights (LeNet-5 pruned 250x and quantized to 3 bits holds ~1,700 bytes of codes and positions
and spent ~1,600 more on four decoders) and it makes the per-weight planner store small streams as
whole bytes and small layers as plain floats. A bundle stores the weights that share a dtype with one decoder:

- one ``uint8`` payload, a bit stream (bit ``t`` is bit ``t % 8`` of byte ``t // 8``) holding, one
  after the other: the *codes*, the *bitmap* (one bit per element of the members in the bitmap
  region) and the *gaps* (``r`` bits each);
- one codebook table, the members' ``[0, v_1, ..., v_K]`` one after the other (float16 where every
  value is exact in it): code 0 is the zero, codes ``1..K`` a member's non-zero values; or, where
  every member's levels are a step times small integers (uniform quantization), a *grid*: one int8
  table ``[0, n_1, .., n_K]`` of the integers any member uses, codes indexing it, and one step per
  member (3 bits: 9 bytes and a float per member instead of 9 floats per member);
- each member in one of three regions of a virtual vector ``V`` (dense members first, then bitmap,
  then gaps members): *dense* (a code for every element, zeros included), *bitmap* (a bit per
  element, 1 where a non-zero code follows: pays from densities of about 1/5 to 1/2) or *gaps*
  (relative positions: a code per non-zero element and an ``r``-bit entry counting the zeros skipped
  before it, ``0 .. 2**r - 2``; the entry ``2**r - 1`` is a *filler* that skips that many zeros and
  has no code). The planner picks every member's region and the gap width for the fewest bytes.
- the codes: an alphabet of ``A = K + 1`` symbols (``K`` the most non-zero values of a member), or
  where no member is dense ``A = K``, codes ``1..K`` stored less 1 (*shift*); each code in
  ``ceil(log2 A)`` bits, or where that saves bits ``g`` codes to one ``w``-bit number in base ``A``
  (*radix*, :func:`radix`: 3-bit levels without the zero, ``A = 6``, take 13 bits for 5 codes, 2.6
  a code). The planner builds the layouts with the smallest payloads and the best of each kind
  (their decoders differ in size) and keeps the smallest file.

Decoder (nodes unnamed; every tensor it makes starts with the bundle's tag, such as ``_A``): ``Cast``
the payload to int32, ``Reshape`` to ``[n, 1]``, ``Div`` by ``2**[0..7]``, ``Mod 2``, ``Reshape``
to bits, ``Split`` into the streams, and for codes and gaps ``Reshape`` to ``[count, width]`` and
``MatMul`` by ``2**[0..width)`` (radix codes: by ``2**[0..w)`` as a column, ``Div`` by
``A**[0..g)``, ``Mod A``, ``Reshape`` to a vector). The *mask* is 1 for each slot that has a code
(every dense element, the bitmap's bits, the gap entries that are not fillers: ``Less(gap, 2**r -
1)``); slot ``i`` takes code ``Gather(codes, CumSum(mask)[i]) * mask[i]`` (the code stream starts
with one unused code, so no ``- 1`` is needed, and masked slots get code 0; shifted codes get their
``+ 1`` before the ``* mask``). The gap entries' positions are ``CumSum`` of their advances (``gap +
1``, or ``2**r - 1`` for a filler) after the dense and bitmap regions, and ``ScatterElements``
places all slots into zeros. ``Split`` cuts ``V`` into the members and the table into their
codebooks (after one ``Cast`` of a float16 table for float32 weights); each member is ``Reshape``-d
to its shape and looked up in its codebook with ``Gather``, whose output carries the weight's name.
With a grid, ``V`` is looked up once in the ``Cast`` grid (float32), ``Split`` into the members and
each ``Mul``-tiplied by its step (the step table ``Split`` into scalars; exact in float32, ``Cast`` to
float16 weights after the product: onnxruntime cannot fold a float16 ``Mul``), then ``Reshape``-d.
Every input is a constant, so onnxruntime folds the chain at load; needs opset 11.

The ``onnxadmm.storage`` metadata holds one entry for the bundle, under its tag: ``format`` =
:data:`FORMAT`, ``bits`` (``ceil(log2 A)``), ``gap_bits``, ``members``: per member ``[name, region,
shape, K, stored, fillers, nonzero]``, and where used ``shift`` (1), ``radix`` (``[A, g, w]``) and
``grid`` (the grid's size; the tables are ``<tag>codebook`` and ``<tag>step``);
:func:`expand_meta` turns it into per-weight descriptions. Files of session 15 (a codebook tensor per
member, ``<tag>codebook<i>``, no shift or radix) are read as well.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxAdmmError
from . import storage as st

FORMAT = "onnxadmm-bundle-1"
OPSET = 11  # CumSum-11, ScatterElements-11 (Less-9 and MatMul-9 on int32, ConstantOfShape-9)
_REGIONS = ("dense", "bitmap", "gaps")
#: Bundles whose payload would exceed this many bits are not made: the decoder unpacks bit by bit
#: (an int32 per bit at load time), which pays for small models, not for big ones.
MAX_BITS = 2**25


@dataclass
class Member:
    """A weight as codes into ``[0, v_1, .., v_K]``: ``codes`` for every element (0 for a zero)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    levels: np.ndarray  # float32 [K], the non-zero values, sorted
    codes: np.ndarray  # int64 [size]

    @property
    def size(self) -> int:
        return int(self.codes.size)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.levels.size + 1)))

    @property
    def positions(self) -> np.ndarray:
        return np.flatnonzero(self.codes)

    @property
    def affine(self) -> tuple[float, np.ndarray] | None:
        """``(step, ints)`` with ``levels == ints * step`` exactly in the weight's dtype (``ints`` small
        non-zero integers: uniform quantization's levels), or None."""
        if not hasattr(self, "_affine"):
            self._affine = _affine(self.levels, self.dtype)
        return self._affine

    @property
    def skips(self) -> np.ndarray:
        """Zeros before each non-zero element (the first counts from position -1)."""
        if not hasattr(self, "_skips"):
            self._skips = st._skips(self.positions)
        return self._skips


def member(name: str, enc: st.Encoded) -> Member | None:
    """``enc`` as a bundle member (None where it cannot be one: raw values, per-channel codebooks,
    no non-zero element)."""
    if enc.raw or enc.groups != 1 or enc.size == 0:
        return None
    w = st.decode(enc).reshape(-1).astype(np.float32) + 0.0  # -0.0 folds into 0.0
    levels = np.unique(w[w != 0])
    if not levels.size:
        return None
    codes = np.zeros(w.size, dtype=np.int64)
    nz = w != 0
    codes[nz] = np.searchsorted(levels, w[nz]) + 1
    return Member(name, enc.shape, enc.dtype, levels, codes)


#: Largest integer level of an affine member (its grid table is stored as int8).
_GRID_MAX = 127


def _affine(levels: np.ndarray, dtype: np.dtype) -> tuple[float, np.ndarray] | None:
    """See :attr:`Member.affine`: the step is the smallest level's magnitude divided by 1..4, the
    first that rebuilds every level exactly (a product rounded in ``dtype``, as the decoder's Mul)."""
    lv = np.asarray(levels, dtype=np.float32)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)) or not lv.size:
        return None
    if not np.all(np.isfinite(lv)):
        return None
    smallest = np.float32(np.min(np.abs(lv)))
    for d in (1, 2, 3, 4):
        step = np.float32(smallest / np.float32(d))
        if not step > 0 or np.float32(step.astype(dtype)) != step:
            continue
        ints = np.rint(lv / step)
        if np.abs(ints).max() > _GRID_MAX or np.any(ints == 0):
            continue
        rebuilt = ints.astype(dtype) * np.asarray(step, dtype=dtype)
        if np.array_equal(rebuilt.astype(np.float32), lv):
            return float(step), ints.astype(np.int64)
    return None


def _grid(members: list[Member]) -> np.ndarray | None:
    """The sorted union of the members' integer levels where every member is affine, else None."""
    if not all(m.affine is not None for m in members):
        return None
    return np.unique(np.concatenate([m.affine[1] for m in members]))


def bundle_key(m: Member) -> str:
    """Members with one key can share a bundle (their codes take the widest member's bits)."""
    return m.dtype.str


def radix(alphabet: int) -> tuple[int, int]:
    """``(g, w)``: codes of ``alphabet`` symbols are stored ``g`` to a ``w``-bit number in base
    ``alphabet`` (``w <= 31``: int32 arithmetic), the fewest bits per code (then the smallest
    ``g``). ``g == 1`` for a power of two. For 6 symbols (3-bit levels without the zero) 5 codes
    take 13 bits: 2.6 bits a code instead of 3; for 3 symbols (ternary) 1.6 instead of 2."""
    alphabet = max(alphabet, 2)
    best = (1, (alphabet - 1).bit_length())
    for g in range(2, 32):
        w = (alphabet**g - 1).bit_length()
        if w > 31:
            break
        if w * best[0] < best[1] * g:
            best = (g, w)
    return best


def _payload_bits(m: Member, region: str, bits: float, r: int) -> float:
    nnz = m.skips.size
    if region == "dense":
        return m.size * bits
    if region == "bitmap":
        return m.size + nnz * bits
    if not r:
        return math.inf
    return (nnz + int((m.skips // (2**r - 1)).sum())) * r + nnz * bits


@dataclass
class _Plan:
    members: list[Member]
    regions: dict[str, str]
    alphabet: int  # symbols of the code stream
    shift: bool  # codes stored less 1 (no member is dense: no code 0 to store)
    grouped: bool  # codes stored in base ``alphabet``, several to a number (see radix)
    gap_bits: int  # 0: no member in the gaps region
    grid: np.ndarray | None = None  # affine codebooks: codes index this integer grid, times a step

    @property
    def bits(self) -> int:
        return max(1, (self.alphabet - 1).bit_length())

    @property
    def radix(self) -> tuple[int, int]:
        """(codes per number, bits per number)."""
        return radix(self.alphabet) if self.grouped else (1, self.bits)

    @property
    def family(self) -> tuple[bool, bool, bool]:
        return self.shift, self.radix[0] > 1, self.grid is not None


def _plans(members: list[Member]) -> list[tuple[float, _Plan]]:
    """Candidate layouts, best payload first: each gap width, each member in its cheapest region;
    codes ``0..K`` where a member may be dense, else ``1..K`` stored less 1 (``K`` symbols); each
    with per-member codebooks and, where every member's levels are a step times small integers, with
    one integer grid (``K`` its size) and a step per member."""
    out = []
    grid = _grid(members)
    kinds = [(None, max(m.levels.size for m in members))]
    if grid is not None:
        kinds.append((grid, grid.size))
    for (grid, kmax), shift, grouped in (
        (k, sh, gr) for k in kinds for sh, gr in ((False, False), (False, True), (True, False), (True, True))
    ):
        alphabet = kmax if shift else kmax + 1
        g, w = radix(alphabet)
        if grouped and g == 1:
            continue
        rate = w / g if grouped else max(1, (alphabet - 1).bit_length())
        for r in range(0, 17):
            for allowed in (
                (("bitmap", "gaps"), ("gaps",), ("bitmap",))
                if shift
                else (_REGIONS, ("dense", "gaps"), ("dense", "bitmap"), ("dense",))
            ):
                if ("gaps" in allowed) != bool(r):
                    continue
                regions, payload = {}, 0.0
                for m in members:
                    cost, region = min((_payload_bits(m, reg, rate, r), reg) for reg in allowed)
                    regions[m.name] = region
                    payload += cost
                if ("gaps" in regions.values()) != bool(r):
                    continue
                out.append((payload, _Plan(members, regions, alphabet, shift, grouped, r, grid)))
    out.sort(key=lambda t: t[0])
    return out


def _table(m: Member) -> np.ndarray:
    """The member's codebook ``[0, v_1, .., v_K]`` (float32)."""
    return np.concatenate([[0.0], m.levels]).astype(np.float32)


def _bit_stream(values: np.ndarray, width: int) -> np.ndarray:
    """``values`` as ``width`` bits each, least significant first (uint8 0/1)."""
    v = np.asarray(values, dtype=np.uint32)
    return ((v[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1)


class _Nodes(st._Builder):
    """A :class:`~onnxadmm.export.storage._Builder` whose nodes have no names (the tag on their
    tensors identifies them)."""

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        value = output or self._name()
        self.nodes.append(helper.make_node(op_type, inputs, [value], **attrs))
        return value

    def multi(self, op_type: str, inputs: list[str], outputs: list[str | None], **attrs) -> list[str]:
        outs = [o or self._name() for o in outputs]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs

    def split(self, x: str, sizes: list[int], outputs: list[str | None]) -> list[str]:
        if len(sizes) == 1:
            return [x]
        if self.opset >= 13:
            return self.multi("Split", [x, self.i64(sizes)], outputs, axis=0)
        return self.multi("Split", [x], outputs, axis=0, split=sizes)


def _build(plan: _Plan, opset: int, tag: str) -> tuple[_Nodes, dict]:
    """The shared decoder of ``plan`` (its outputs named after the members) and its metadata entry."""
    b = _Nodes(opset, tag)
    bits, r = plan.bits, plan.gap_bits
    per, cbits = plan.radix  # codes per number, bits per number
    order = [m for reg in _REGIONS for m in plan.members if plan.regions[m.name] == reg]
    region = [plan.regions[m.name] for m in order]
    sizes = [m.size for m in order]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    n_total = int(sum(sizes))
    n_dense = sum(s for s, reg in zip(sizes, region) if reg == "dense")
    base = n_dense + sum(s for s, reg in zip(sizes, region) if reg == "bitmap")
    masked = base > n_dense or bool(r)

    codes = [np.zeros(1 if masked else 0, np.int64)]  # one unused code first: CumSum(mask) indexes it
    bitmap, gap_pos, stored, fillers = [], [], [], []
    for i, (m, reg) in enumerate(zip(order, region)):
        nz = m.codes != 0
        mcodes = m.codes
        if plan.grid is not None:  # level k of the member -> 1 + the index of its integer in the grid
            lookup = np.concatenate([[0], np.searchsorted(plan.grid, m.affine[1]) + 1])
            mcodes = lookup[m.codes]
        codes.append(mcodes if reg == "dense" else mcodes[nz])
        stored.append(m.size if reg == "dense" else int(nz.sum()))
        if reg == "bitmap":
            bitmap.append(nz.astype(np.int64))
        if reg == "gaps":
            gap_pos.append(starts[i] - base + np.flatnonzero(nz))
    codes = np.concatenate(codes)
    if plan.shift:
        codes = np.maximum(codes - 1, 0)  # (the unused first code stays 0)
    n_codes = codes.size
    if per > 1:  # per codes to a cbits-bit number, the last group padded with zeros
        codes = np.concatenate([codes, np.zeros(-codes.size % per, np.int64)]).reshape(-1, per)
        codes = codes @ (plan.alphabet ** np.arange(per, dtype=np.int64))
    gaps = np.zeros(0, np.int64)
    if r:
        filler = 2**r - 1
        pos = np.concatenate(gap_pos)
        skips = np.diff(pos, prepend=-1) - 1
        nfill = skips // filler
        gaps = np.full(pos.size + int(nfill.sum()), filler, dtype=np.int64)
        real_at = np.cumsum(nfill + 1) - 1
        gaps[real_at] = skips - nfill * filler
        # a member's fillers: those before its first element, up to the previous member's last
        bounds = np.cumsum([p.size for p in gap_pos])
        for n_before, k in zip(np.concatenate([[0], bounds[:-1]]), [p.size for p in gap_pos]):
            fillers.append(int(nfill[n_before : n_before + k].sum()))
    fillers = [0] * (len(order) - len(fillers)) + fillers
    bitmap = np.concatenate(bitmap) if bitmap else np.zeros(0, np.int64)

    streams = [(codes, cbits), (bitmap, 1), (gaps, r)]
    stream_bits = [np.concatenate([_bit_stream(v, width) for v, width in streams if v.size])]
    nbits = int(stream_bits[0].size)
    payload = np.packbits(np.concatenate(stream_bits + [np.zeros(-nbits % 8, np.uint8)]), bitorder="little")
    i32 = TensorProto.INT32

    # bits of the payload
    x = b.op("Cast", [b.payload("data", payload)], to=i32)
    x = b.op("Reshape", [x, b.i64([payload.size, 1])])  # sizes, not -1: a varint each
    x = b.op("Mod", [b.op("Div", [x, b.i32([2**k for k in range(8)])]), b.i32(2)])
    x = b.op("Reshape", [x, b.i64([payload.size * 8])])
    lengths = [v.size * width for v, width in streams if v.size]
    if payload.size * 8 > nbits:
        lengths.append(payload.size * 8 - nbits)
    parts = iter(b.split(x, lengths, [None] * len(lengths)))

    def values_of(count: int, width: int) -> str:
        part = next(parts)
        if width == 1:
            return part
        part = b.op("Reshape", [part, b.i64([count, width])])
        return b.op("MatMul", [part, b.i32([2**k for k in range(width)])])

    if per == 1:
        code_of = values_of(codes.size, cbits)
    else:  # [numbers, cbits] bits -> [numbers, 1] -> [numbers, per] digits -> [numbers * per] codes
        part = b.op("Reshape", [next(parts), b.i64([codes.size, cbits])])
        number = b.op("MatMul", [part, b.i32([[2**k] for k in range(cbits)])])
        digits = b.op("Div", [number, b.i32([plan.alphabet**k for k in range(per)])])
        code_of = b.op("Mod", [digits, b.i32(plan.alphabet)])
        code_of = b.op("Reshape", [code_of, b.i64([codes.size * per])])
    ones_cache: dict[int, str] = {}

    def ones(n: int) -> str:
        if n not in ones_cache:
            one = numpy_helper.from_array(np.ones(1, np.int32))
            ones_cache[n] = b.op("ConstantOfShape", [b.i64([n])], value=one)
        return ones_cache[n]

    idx = code_of
    pos = None
    if masked:
        mask_parts = [ones(n_dense)] if n_dense else []
        if bitmap.size:
            mask_parts.append(values_of(bitmap.size, 1))
        if r:
            g = values_of(gaps.size, r)
            real = b.op("Cast", [b.op("Less", [g, b.i32(2**r - 1)])], to=i32)
            mask_parts.append(real)
            adv = b.op("Add", [g, real])  # gap + 1 for an element, 2**r - 1 for a filler
            if base:
                adv = b.op("Concat", [ones(base), adv], axis=0)
            pos = b.op("Sub", [b.op("CumSum", [adv, b.i32(0)]), b.i32(1)])
        mask = mask_parts[0] if len(mask_parts) == 1 else b.op("Concat", mask_parts, axis=0)
        idx = b.op("Gather", [code_of, b.op("CumSum", [mask, b.i32(0)])], axis=0)
        if plan.shift:
            idx = b.op("Add", [idx, b.i32(1)])
        idx = b.op("Mul", [idx, mask])
    if pos is not None:
        zero = numpy_helper.from_array(np.zeros(1, np.int32))
        idx = b.op("ScatterElements", [b.op("ConstantOfShape", [b.i64([n_total])], value=zero), pos, idx], axis=0)
    padding = 0 if masked else codes.size * per - n_codes  # all dense: the codes are V, padding cut off
    dtype = order[0].dtype
    to = st._NP_TO_ONNX[dtype]
    members = []
    if plan.grid is not None:
        # the grid [0, n_1, .., n_K] as int8, Cast, looked up once for all of V, then Split into the
        # members, each times its step (one table of steps, float16 where exact, Split into them).
        # The products are float32 (onnxruntime's CPU Mul has no float16 kernel to fold with), exact
        # there (|n| <= 127 times an 11-bit float16 step), then Cast once to a float16 weight: the
        # float16 product rounded once, as the weight's own.
        f32 = TensorProto.FLOAT
        grid = b.op("Cast", [b.payload("codebook", np.concatenate([[0], plan.grid]).astype(np.int8))], to=f32)
        values = b.op("Gather", [grid, idx], axis=0)
        pieces = b.split(values, sizes + [padding] * bool(padding), [None] * (len(order) + bool(padding)))
        steps = st._stored_floats(np.array([m.affine[0] for m in order], np.float32), dtype)
        step = b.payload("step", steps)
        if steps.dtype != np.float32:
            step = b.op("Cast", [step], to=f32)
        step_of = b.split(step, [1] * len(order), [None] * len(order))
    else:
        pieces = b.split(idx, sizes + [padding] * bool(padding), [None] * (len(order) + bool(padding)))
        # one table of every member's codebook (float16 where all are exact: one Cast), Split into them
        tables = st._stored_floats(np.concatenate([_table(m) for m in order]).astype(np.float32), dtype)
        book = b.payload("codebook", tables)
        if tables.dtype != dtype:
            book = b.op("Cast", [book], to=to)
        books = b.split(book, [m.levels.size + 1 for m in order], [None] * len(order))
    for i, (m, reg, piece) in enumerate(zip(order, region, pieces)):
        if plan.grid is not None:  # Mul, then Cast and Reshape where needed; the last one is the weight
            cast, reshape = dtype != np.float32, len(m.shape) != 1
            piece = b.op("Mul", [piece, step_of[i]], None if cast or reshape else m.name)
            if cast:
                piece = b.op("Cast", [piece], None if reshape else m.name, to=to)
            if reshape:
                b.op("Reshape", [piece, b.i64(list(m.shape))], m.name)
        else:
            if len(m.shape) != 1:
                piece = b.op("Reshape", [piece, b.i64(list(m.shape))])
            b.op("Gather", [books[i], piece], m.name, axis=0)
        members.append(
            [m.name, reg, list(m.shape), int(m.levels.size), stored[i], fillers[i], int(np.count_nonzero(m.codes))]
        )
    entry = {"format": FORMAT, "bits": bits, "gap_bits": r, "members": members}
    if per > 1:
        entry["radix"] = [plan.alphabet, per, cbits]
    if plan.shift:
        entry["shift"] = 1
    if plan.grid is not None:
        entry["grid"] = int(plan.grid.size)
    return b, entry


def too_big(members: list[Member]) -> bool:
    """Whether the members' codes alone exceed :data:`MAX_BITS` (no bundle is made of them)."""
    return sum(m.skips.size for m in members) * max(m.bits for m in members) > MAX_BITS


def meta_bytes(tag: str, entry: dict) -> int:
    """Bytes the bundle's metadata entry adds to the ``onnxadmm.storage`` JSON."""
    return len(json.dumps({tag: entry}, sort_keys=True, separators=(",", ":")).encode()) - 2


def build(
    members: list[Member], opset: int, tag: str = "_A", plans: int = 4
) -> tuple[_Nodes, dict, int]:
    """The cheapest bundle of ``members`` (one :func:`bundle_key`; codes at the widest member's
    bits): its builder, its metadata entry and the bytes it adds to a file (data, nodes and
    headers, metadata). The ``plans`` layouts with the smallest payloads are built and measured."""
    if opset < OPSET:
        raise OnnxAdmmError(f"a bundle needs opset >= {OPSET}, not {opset}")
    if len({bundle_key(m) for m in members}) != 1:
        raise OnnxAdmmError("bundle: every member needs the same dtype")
    if not all(np.any(m.codes) for m in members):
        raise OnnxAdmmError("bundle: a member is all zeros")
    if too_big(members):
        raise OnnxAdmmError(f"bundle: more than {MAX_BITS} bits of payload")
    if sum(m.size for m in members) > st._INT32_LIMIT:
        raise OnnxAdmmError("bundle: more elements than int32 positions address")
    best = None
    ranked = _plans(members)
    # the smallest payloads with per-member codebooks and with a grid (equal payloads: the grid's
    # must not crowd the others out, their decoders differ), and the best of each family
    tried = [c for c in ranked if c[1].grid is None][:plans] + [c for c in ranked if c[1].grid is not None][:plans]
    for candidate in ranked:
        if candidate[1].family not in {p.family for _, p in tried}:
            tried.append(candidate)
    for payload, plan in tried:
        if payload > MAX_BITS:
            continue
        b, entry = _build(plan, opset, tag)
        sizes = b.bytes_by_role()
        cost = sizes["total"] + sizes["nodes"] + meta_bytes(tag, entry)
        if best is None or cost < best[2]:
            best = (b, entry, cost)
    if best is None:
        raise OnnxAdmmError(f"bundle: more than {MAX_BITS} bits of payload")
    return best


def expand_meta(tag: str, entry: dict) -> dict[str, dict]:
    """Per-member descriptions (the keys of :func:`onnxadmm.export.storage.analyze`'s entries)."""
    out = {}
    for name, region, shape, k, stored, fillers, nonzero in entry["members"]:
        out[name] = {
            "format": FORMAT,
            "tag": tag,
            "region": region,
            "shape": shape,
            "bits": entry["bits"],
            "raw": False,
            "K": k,
            "groups": 1,
            "group_axis": None,
            "sparse": region != "dense",
            "gap_bits": entry["gap_bits"] if region == "gaps" else 0,
            "code_bits": entry["radix"][2] / entry["radix"][1] if "radix" in entry else entry["bits"],
            "stored": stored,
            "fillers": fillers,
            "nonzero": nonzero,
        }
    return out
