"""Federated LoRA training from a config file.

    python scripts/train.py --config configs/dolly.py[:preset] [--config.a.b=value ...] [--resume]

Presets: configs/dolly.py (default, smoke, llama2-7b, deepseek-7b), configs/natural_instructions.py.
Every key of the config can be overridden, e.g. ``--config.algorithm.name=fedsa_lora
--config.federated.rounds=10``. A mistake in the config, data or model spec is reported in one
line; ``--debug`` shows the traceback instead.

Exit status: 0 done (or stopped under ``run.on_no_valid_client="stop"``), 2 a mistake in the
config, data or model spec, 3 a round had no valid client (every sampled client sent non-finite
values) under ``run.on_no_valid_client="error"``, 130 interrupted.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

USER_ERRORS = (ValueError, FileNotFoundError)  # ConfigError, DataError, ModelLoadError, ...


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(flags, ["a.b=value", ...]) from argv; ``--config.a.b value`` works too."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(REPO / "configs" / "dolly.py"), help="file.py[:preset]"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r}")
        item = item[len("--config.") :]
        if "=" not in item:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                parser.error(f"--config.{item}: missing value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from fedlora_jax import runner  # after parsing, so that --help is quick
    from fedlora_jax.config import load_config

    try:
        cfg = load_config(args.config, overrides)
        result = runner.run(cfg, resume=args.resume, progress=not args.no_progress)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    except runner.NoValidClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(f"run dir: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
