"""How much of each shared model the channel-removal pass (``export.shrink``) can reach.

For every ONNX file under ``../shared/models``: the compressible layers whose output channels
structured pruning can cut out of the file (``onnxadmm inspect``'s "removable" column), and the
most common reasons the others keep theirs. No training: the graph analysis alone.

    python benchmarks/shrink_coverage.py            # print the table
    python benchmarks/shrink_coverage.py --write    # and rewrite its docs section
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import write_section  # noqa: E402

SHARED = Path(os.environ.get("ONNXADMM_SHARED", ROOT.parent / "shared"))  # as the tests
SECTION = "Channel removal: coverage of the shared models"


def _reason(why: str) -> str:
    """A reason without the node's own name, so that reasons group."""
    return re.sub(r" '[^']*'$", "", why)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the docs section")
    args = ap.parse_args()
    from onnxadmm.export.shrink import removable_channels
    from onnxadmm.modelio import load_model

    models = sorted((SHARED / "models").glob("*/*.onnx"))
    if not models:
        sys.exit(f"no models under {SHARED / 'models'}")
    lines = [
        "| model | layers | removable | kept: most common reasons |",
        "|---|---:|---:|---|",
    ]
    for path in models:
        res = removable_channels(load_model(path))
        kept = Counter(_reason(v) for v in res.values() if v is not None)
        why = "; ".join(f"{r} ({n})" for r, n in kept.most_common(3))
        name = path.relative_to(SHARED / "models")
        lines.append(f"| `{name}` | {len(res)} | {sum(v is None for v in res.values())} | {why} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        body = (
            "Compressible layers whose output channels structured pruning can cut out of the written "
            "file (what `onnxadmm inspect` shows per layer), per shared model, and the most common "
            "reasons the others keep theirs (a graph output or a classifier's Softmax is expected for "
            "the last layer). Graph analysis only, no training.\n\n"
            f"{table}\n\n"
            f"- Command: `python benchmarks/shrink_coverage.py --write`\n"
            f"- Date: {datetime.date.today().isoformat()}\n"
        )
        write_section(ROOT / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
