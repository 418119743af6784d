"""Generate text from a model (folder, .gguf, hub id or alias), optionally with a PEFT adapter.

    python scripts/generate.py --model smollm2-135m --chat --prompt "What is the capital of France?"
    python scripts/generate.py --model stories260k --prompt "Once upon a time" --prompt "Tom had"

Several --prompt flags run as one left-padded batch. Greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id or alias")
    p.add_argument("--adapters", help="PEFT LoRA folder (adapter_model.safetensors + config)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling key")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and compute dtype",
    )
    return p.parse_args(argv)


def encode(tokenizer: Any, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids per prompt; with ``chat`` via the tokenizer's chat template (BOS etc. inside)."""
    if not chat:
        return [tokenizer(p)["input_ids"] for p in prompts]
    if not tokenizer.chat_template:
        raise ValueError("--chat: this model's tokenizer has no chat template; drop --chat")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def check_positions(ids: list[list[int]], max_new_tokens: int, positions: int) -> None:
    """Refuse prompts whose tokens plus ``max_new_tokens`` exceed the model's positions: past
    ``max_position_embeddings`` the model was never trained and the output is meaningless."""
    for i, row in enumerate(ids):
        if len(row) + max_new_tokens > positions:
            which = f"--prompt #{i + 1}" if len(ids) > 1 else "--prompt"
            raise ValueError(
                f"{which} is {len(row)} tokens; with --max-new-tokens {max_new_tokens} that "
                f"exceeds the model's {positions} positions (max_position_embeddings): shorten "
                "the prompt or lower --max-new-tokens"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax  # deferred so --help is instant
    import jax.numpy as jnp

    from fedlora_jax.adapters.peft import load_peft
    from fedlora_jax.model.generate import generate, left_pad
    from fedlora_jax.model.hub import resolve_model

    try:
        model = resolve_model(args.model, dtype=args.dtype)
        adapters, adapter_cfg = None, None
        if args.adapters:
            adapters, adapter_cfg = load_peft(args.adapters, model.cfg)
        tok = model.tokenizer
        eos = set(model.cfg.eos_ids)
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos, default=0)
        ids = encode(tok, args.prompt, args.chat)
        check_positions(ids, args.max_new_tokens, model.cfg.max_position_embeddings)
        tokens, mask = left_pad(ids, pad_id=pad)
        new, lengths = generate(
            model.base,
            adapters,
            tokens,
            mask,
            cfg=model.cfg,
            adapter_cfg=adapter_cfg,
            max_new_tokens=args.max_new_tokens,
            eos_ids=sorted(eos),
            temperature=args.temperature,
            top_p=args.top_p,
            key=jax.random.PRNGKey(args.seed),
            compute_dtype=jnp.dtype(args.dtype),
            pad_id=pad,
        )
    except (ValueError, FileNotFoundError) as e:  # ModelLoadError and config errors included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# model: {model.source}", file=sys.stderr)
    for i, (row, n) in enumerate(zip(jax.device_get(new), jax.device_get(lengths), strict=True)):
        text = tok.decode(row[:n].tolist(), skip_special_tokens=True)
        print(text if len(args.prompt) == 1 else f"[{i}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
