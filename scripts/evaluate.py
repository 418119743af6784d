"""Evaluate a run's checkpoint: global and personal ROUGE-L / loss report.

    python scripts/evaluate.py --run_dir runs/dolly-default-fedit-seed0 [--round N]
        [--config.eval.max_examples_per_client=0 --config.eval.max_new_tokens=128 ...]

Rebuilds the model and data from the run's config.json (only ``eval.*`` may be overridden),
restores the checkpoint of round N (default: the latest), prints the report as markdown and
writes it to ``<run_dir>/eval_round<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

USER_ERRORS = (ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--round", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [r for r in rest if not r.startswith("--config.eval.") or "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments {bad}; only --config.eval.<key>=<value> overrides")
    try:
        from fedlora_jax import runner
        from fedlora_jax.eval.report import render_markdown

        report = runner.evaluate_checkpoint(
            args.run_dir, round_=args.round, overrides=[r[len("--config.") :] for r in rest]
        )
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    out = pathlib.Path(args.run_dir) / f"eval_round{report['round']}.json"
    out.write_text(json.dumps(report, indent=1))
    print(render_markdown(report))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
