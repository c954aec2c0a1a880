"""The least weight storage a pruned LeNet-5 can have, positions included: an information bound.

For k non-zeros placed among n weights with no structure, naming their positions takes at least
log2 C(n, k) bits, whatever the encoding. Per layer k comes from onnxadmm's automatic allocation
(``onnxadmm.compress.pruning.allocate``); values cost b bits each; codebooks are not counted. Prints
the compression ratio fp32 bytes / floor bytes for each pruning rate and b.

    python benchmarks/storage_floor.py [--rates 100,246,300,400,500] [--bits 1,2,3]
"""

from __future__ import annotations

import argparse
import math

from onnxadmm.compress.pruning import allocate

LENET5 = {"conv1.weight": 500, "conv2.weight": 25_000, "fc1.weight": 400_000, "fc2.weight": 5_000}


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def floor_bytes(sizes: dict[str, int], rate: float, bits: int) -> tuple[int, float]:
    """(non-zeros, bytes at the bound) for ``sizes`` pruned to ``rate`` with ``bits``-bit values."""
    keep = allocate(sizes, rate)
    total_bits = sum(log2_binomial(sizes[n], keep[n]) + bits * keep[n] for n in sizes)
    return sum(keep.values()), total_bits / 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100,246,300,400,500")
    ap.add_argument("--bits", default="1,2,3")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    bits = [int(b) for b in args.bits.split(",")]
    fp32 = 4 * sum(LENET5.values())
    print("| pruning rate | non-zeros | " + " | ".join(f"b = {b}" for b in bits) + " |")
    print("|---|---|" + "---|" * len(bits))
    for r in rates:
        cells = []
        for b in bits:
            k, nbytes = floor_bytes(LENET5, r, b)
            cells.append(f"{fp32 / nbytes:,.0f}x")
        print(f"| {r:g}x | {k:,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
