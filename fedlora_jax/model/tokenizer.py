"""Tokenizers for model folders: transformers' AutoTokenizer with one-line errors.

transformers only builds a tokenizer from a GGUF file slowly (~15 s for SmolLM2), so converters
save it once with ``save_pretrained`` and later loads are plain folder loads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from fedlora_jax.model.convert import ModelLoadError, ModelNotFoundError

# Files that make up a HF tokenizer (any subset that transformers recognises).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Files a converted copy should keep next to the weights: tokenizer, generation defaults, license.
SIDECAR_FILES = (*TOKENIZER_FILES, "generation_config.json", "LICENSE", "LICENSE.txt")
_CORE_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class TokenizerLoadError(ModelLoadError):
    """A folder has no usable tokenizer."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``; TokenizerLoadError names the folder if not."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder (looking for a tokenizer)")
    if not any((folder / name).is_file() for name in _CORE_FILES):
        raise TokenizerLoadError(
            f"{folder}: no tokenizer here (looked for {', '.join(_CORE_FILES)}); copy the "
            "tokenizer files of the original model into this folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise TokenizerLoadError(f"{folder}: tokenizer failed to load: {_first_line(e)}") from e


def load_gguf_tokenizer(gguf_path: str | os.PathLike) -> Any:
    """The tokenizer embedded in a GGUF file (slow: transformers rebuilds it from metadata)."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise TokenizerLoadError(f"{gguf_path}: tokenizer failed to load: {_first_line(e)}") from e


def save_gguf_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Save a GGUF file's tokenizer as plain files in ``out_dir`` so later loads are fast."""
    load_gguf_tokenizer(gguf_path).save_pretrained(str(out_dir))
    return Path(out_dir)


def copy_sidecar_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy whichever SIDECAR_FILES ``src`` has into ``dst``; returns the names copied."""
    copied = []
    for name in SIDECAR_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
