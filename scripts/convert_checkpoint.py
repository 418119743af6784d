"""Convert a checkpoint (HF folder, .gguf file, hub id or alias) to a HF safetensors folder.

    python scripts/convert_checkpoint.py SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2
    python scripts/convert_checkpoint.py llama2-7b out/llama2-7b-bf16 --dtype bfloat16 \\
        --max-shard-gb 2

Tokenizer files (or a GGUF's embedded tokenizer), generation_config.json and LICENSE are copied
along, so the output is a complete model folder for this library and for transformers.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="HF folder, .gguf file, hub id or alias")
    p.add_argument("out", help="output folder (created)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="cast the weights (default: keep the source dtype; GGUF -> float32)",
    )
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit")
    args = p.parse_args(argv)

    from fedlora_jax.model.convert import load_gguf, load_hf_folder, save_hf_folder
    from fedlora_jax.model.hub import locate
    from fedlora_jax.model.tokenizer import copy_sidecar_files, save_gguf_tokenizer

    try:
        start = time.perf_counter()
        src, source = locate(args.source)
        out = pathlib.Path(args.out)
        if out.resolve() == (src.parent if src.is_file() else src).resolve():
            raise ValueError(f"{out}: output folder must differ from the source folder")
        cfg, base = load_gguf(src, args.dtype) if src.is_file() else load_hf_folder(src, args.dtype)
        save_hf_folder(cfg, base, out, max_shard_bytes=int(args.max_shard_gb * 2**30))
        if src.is_file():
            save_gguf_tokenizer(src, out)
        else:
            copy_sidecar_files(src, out)
    except (ValueError, FileNotFoundError) as e:  # ModelLoadError / ModelNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {source} -> {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
