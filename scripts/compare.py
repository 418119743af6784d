"""Compare run directories (e.g. algorithms x seeds): mean ± std table and curves.

    python scripts/compare.py runs/*-seed* --out runs/comparison [--group_by algorithm.name]

Runs are grouped by a config key (default ``algorithm.name``); each group's final global/personal
metrics are reported as mean ± std over its runs (e.g. seeds). Writes comparison.md and
comparison.png into --out. Runs whose training budgets differ (client steps or rows per round,
rounds; docs/protocol.md) are refused in one line unless ``--allow_unmatched_budgets``, and so
are groups not scored on the same evaluation rows (each run's final_eval.json records them;
every group must hold the same row sets, e.g. one per seed) unless
``--allow_unmatched_eval_rows``. Runs from before the record are compared by their config's
data section, model and evaluation cap, with a warning.
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
    parser.add_argument(
        "--allow_unmatched_budgets", action="store_true", help="compare runs of unequal budgets"
    )
    parser.add_argument(
        "--allow_unmatched_eval_rows",
        action="store_true",
        help="compare groups scored on different evaluation rows",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from fedlora_jax import protocol
    from fedlora_jax.report import compare, group_of

    runs = [str(pathlib.Path(d)) for d in args.run_dirs]
    try:
        groups = {str(d): g for d, g in group_of(runs, args.group_by)}
        if not args.allow_unmatched_budgets:
            protocol.check_budgets({d: protocol.run_dir_budget(d) for d in runs})
        if not args.allow_unmatched_eval_rows:
            rows, unrecorded = protocol.rows_of_runs(runs)
            if unrecorded:
                print(
                    f"warning: {', '.join(unrecorded)}: final_eval.json records no evaluation "
                    "rows (an older or unfinished run), so the runs' rows are compared by "
                    f"config only ({', '.join(protocol.ROW_KEYS)})",
                    file=sys.stderr,
                )
            protocol.check_eval_rows(rows, groups)
        path = compare(runs, args.out, group_by=args.group_by)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
