"""Tokenizers for model folders: transformers' AutoTokenizer with one-line errors.

A GGUF file has no ``tokenizer.json``: its vocabulary, merges, special tokens and chat template
are metadata. transformers can rebuild a tokenizer from them, but only with torch installed (its
GGUF reader imports torch), and torch is not a runtime dependency. So a byte-level BPE GGUF
(SmolLM2's kind) is rebuilt here from the ``gguf`` package's reader and the ``tokenizers``
library, the way transformers' GGUF converter builds it, and converters save it once so later
loads are plain folder loads.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_jax.model.convert import ModelLoadError, ModelNotFoundError, _gguf_field

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
    """A folder or GGUF file has no usable tokenizer."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def _transformers() -> Any:
    """transformers, imported without its "PyTorch was not found" advice: the runtime uses its
    tokenizers only, so a torch-free install is the normal case, not something to warn about."""
    if "transformers" not in sys.modules:
        before = os.environ.get(_NO_ADVICE)
        os.environ[_NO_ADVICE] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if before is None:
                del os.environ[_NO_ADVICE]
            else:
                os.environ[_NO_ADVICE] = before
    return sys.modules["transformers"]


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``; TokenizerLoadError names the folder if not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder (looking for a tokenizer)")
    if not any((folder / name).is_file() for name in _CORE_FILES):
        raise TokenizerLoadError(
            f"{folder}: no tokenizer here (looked for {', '.join(_CORE_FILES)}); copy the "
            "tokenizer files of the original model into this folder"
        )
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise TokenizerLoadError(f"{folder}: tokenizer failed to load: {_first_line(e)}") from e


# llama.cpp's token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4
# Pre-tokenizer names for which transformers' GGUF converter splits text with GPT-2's own regex
# (the ByteLevel default). For "smollm", llama.cpp also isolates each digit; transformers does not,
# and neither do we: the comparison target is transformers' tokenizer.
_GPT2_SPLIT_PRE = ("gpt-2", "smollm")


@dataclass(frozen=True)
class GGUFTokenizerSpec:
    """The tokenizer a GGUF file describes, as llama.cpp stores it (``tokenizer.ggml.*``)."""

    model: str  # "gpt2" (byte-level BPE), "llama" (sentencepiece), ...
    pre: str | None  # the pre-tokenizer's name, e.g. "smollm"
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special: dict[str, str | None]  # bos/eos/unk/pad token -> its text
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_gguf_tokenizer(gguf_path: str | os.PathLike) -> GGUFTokenizerSpec:
    """The tokenizer metadata of a GGUF file (the ``gguf`` package's reader; no torch)."""
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"{gguf_path}: no such GGUF file (looking for a tokenizer)")
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{gguf_path}: not a readable GGUF file ({e})") from None

    def field(key: str, default: Any = None) -> Any:
        return _gguf_field(reader, f"tokenizer.{key}", default)

    tokens = field("ggml.tokens")
    if not tokens:
        raise TokenizerLoadError(f"{gguf_path}: no tokenizer in this GGUF (tokenizer.ggml.tokens)")
    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        i = field(f"ggml.{name}_token_id")
        if i is not None and not 0 <= i < len(tokens):
            raise TokenizerLoadError(
                f"{gguf_path}: tokenizer.ggml.{name}_token_id={i} is outside the vocabulary "
                f"(0..{len(tokens) - 1})"
            )
        special[{"unknown": "unk", "padding": "pad"}.get(name, name) + "_token"] = (
            None if i is None else tokens[i]
        )
    return GGUFTokenizerSpec(
        model=field("ggml.model", "llama"),
        pre=field("ggml.pre"),
        tokens=tokens,
        token_types=field("ggml.token_type") or [],
        merges=field("ggml.merges") or [],
        special=special,
        add_bos=bool(field("ggml.add_bos_token", False)),
        add_eos=bool(field("ggml.add_eos_token", False)),
        chat_template=field("chat_template"),
    )


def build_byte_level_bpe(spec: GGUFTokenizerSpec) -> Any:
    """A ``PreTrainedTokenizerFast`` for a byte-level BPE spec, built as transformers' GGUF
    converter builds it (GPT2Tokenizer's model, pre-tokenizer and decoder; control tokens special,
    user-defined ones added; BOS/EOS post-processing from the add_bos/add_eos flags)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    transformers = _transformers()
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # after the quiet import

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:  # GGUF stores some tokens as raw text, not in byte spelling
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ")) for m in spec.merges]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"merge {bad} ({spec.merges[bad]!r}) is not two tokens")
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(spec.tokens, spec.token_types, strict=False))
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers
    # skips it, as adding it would grow the vocabulary past the model's.
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in typed
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in typed
            if kind == _USER_DEFINED and t in vocab
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **spec.special,
        add_bos_token=spec.add_bos,
        add_eos_token=spec.add_eos,
        chat_template=spec.chat_template,
    )


def _transformers_gguf_tokenizer(gguf_path: Path, spec: GGUFTokenizerSpec) -> Any:
    """transformers' own GGUF tokenizer, for the kinds not built here (its reader needs torch)."""
    auto = _transformers().AutoTokenizer
    try:
        return auto.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ImportError as e:
        raise TokenizerLoadError(
            f"{gguf_path}: tokenizer kind {spec.model!r} (pre-tokenizer {spec.pre!r}) is built "
            f"only by transformers' GGUF reader, which needs torch ({_first_line(e)}); without "
            f"torch, byte-level BPE GGUFs with pre-tokenizer {' or '.join(_GPT2_SPLIT_PRE)} work"
        ) from e


def load_gguf_tokenizer(gguf_path: str | os.PathLike) -> Any:
    """The tokenizer embedded in a GGUF file; TokenizerLoadError names the file if not."""
    gguf_path = Path(gguf_path)
    spec = read_gguf_tokenizer(gguf_path)
    try:
        if spec.model == "gpt2" and spec.pre in _GPT2_SPLIT_PRE:
            return build_byte_level_bpe(spec)
        return _transformers_gguf_tokenizer(gguf_path, spec)
    except TokenizerLoadError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise TokenizerLoadError(f"{gguf_path}: tokenizer failed to load: {_first_line(e)}") from e


def save_gguf_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Save a GGUF file's tokenizer as plain files in ``out_dir`` (tokenizer.json, its config and
    chat template) so later loads are ``AutoTokenizer.from_pretrained(out_dir)``."""
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
