"""Compare run directories (e.g. algorithms x seeds): mean ± std table and curves.

    python scripts/compare.py runs/*-seed* --out runs/comparison [--group_by algorithm.name]

Runs are grouped by a config key (default ``algorithm.name``); each group's final global/personal
metrics are reported as mean ± std over its runs (e.g. seeds). Writes comparison.md and
comparison.png into --out.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--group_by", default="algorithm.name", help="a dotted config key")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from fedlora_jax.report import compare

    try:
        path = compare(args.run_dirs, args.out, group_by=args.group_by)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
