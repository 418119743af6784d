"""Federated LoRA training from a config file.

    python scripts/train.py --config configs/dolly.py[:preset] [--config.a.b=value ...] [--resume]

Presets: configs/dolly.py (default, smoke, llama2-7b, deepseek-7b), configs/natural_instructions.py.
Every key of the config can be overridden, e.g. ``--config.algorithm.name=fedsa_lora
--config.federated.rounds=10``. A mistake in the config, data or model spec is reported in one
line; ``--debug`` shows the traceback instead.

Several processes (hosts), docs/scaling.md: every process runs the same command. JAX's
multi-controller runtime starts by itself on TPU pod slices and SLURM (more than one task), or
from ``--coordinator host:port --num_processes N --process_id i`` (else the environment's
``FEDLORA_COORDINATOR``, ``FEDLORA_NUM_PROCESSES``, ``FEDLORA_PROCESS_ID``). The processes check
that they hold the same config (one line naming those that differ), each prepares only its own
clients' batches (``federated.backend=mesh``), and only process 0 prints and writes the run
directory; checkpoints are written by all of them, so ``run.out_dir`` must be a directory every
process sees. A start-up error on any process (config, data, model, run directory) stops every
process with the same line, ``error: process N: ...``.

Exit status: 0 done (or stopped under ``run.on_no_valid_client="stop"``), 2 a mistake in the
config, data or model spec, 3 a round had no valid client (every sampled client sent non-finite
values) under ``run.on_no_valid_client="error"``, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

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
    parser.add_argument(
        "--stop_after_round", type=int, help="end after this round (resumable with --resume)"
    )
    parser.add_argument("--coordinator", help="several processes: host:port of process 0")
    parser.add_argument("--num_processes", type=int, help="several processes: how many")
    parser.add_argument("--process_id", type=int, help="several processes: this one's, from 0")
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


@contextlib.contextmanager
def _silent_unless(primary: bool) -> Iterator[None]:
    """Process 0 prints; the others' stdout goes nowhere, Python's and the native libraries'
    alike (gloo's connection lines); their errors still reach stderr."""
    if primary:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _error(text: str) -> None:
    """``error: ...`` on stderr; in a multi-process run prefixed with the process."""
    import jax

    who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(f"error: {who}{text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # after parsing, so that --help is quick; the multi-controller runtime starts before
    # anything else touches jax
    from fedlora_jax.federated import distributed

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fedlora_jax import runner
    from fedlora_jax.config import load_config, to_dict

    primary = distributed.is_primary()
    progress = primary and not args.no_progress

    def start() -> runner.Started:  # everything that can fail on one host only
        cfg = load_config(args.config, overrides)
        return runner.start(cfg, resume=args.resume, progress=progress)

    try:
        with _silent_unless(primary):
            started = distributed.start_together(start, lambda s: to_dict(s.cfg))
            result = runner.train(
                started, stop_after_round=args.stop_after_round, progress=progress
            )
    except distributed.StartError as e:  # the same line on every process
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if args.debug:
            raise
        _error(f"{e}  (--debug shows the traceback)")
        return 2
    except runner.NoValidClientError as e:
        _error(str(e))
        return 3
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    if primary:
        print(f"run dir: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
