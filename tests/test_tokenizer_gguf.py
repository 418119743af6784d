"""The torch-free SmolLM2 tokenizer (model/tokenizer.py) against transformers' own GGUF tokenizer.

transformers builds a tokenizer from a GGUF file only with torch installed; the runtime has no
torch, so the project rebuilds it from the GGUF metadata. The reference here is transformers'
tokenizer (torch is in the test extra); ours is built in a subprocess where torch cannot be
imported, saved, and loaded back as a plain folder, as the runtime loads it.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fedlora_jax
from fedlora_jax.model.convert import ModelNotFoundError
from fedlora_jax.model.tokenizer import TokenizerLoadError, load_gguf_tokenizer

DOLLY = (
    Path(fedlora_jax.__file__).resolve().parent
    / "resources/data/dolly/databricks-dolly-15k.jsonl.gz"
)

# Builds the tokenizer with torch unimportable (as on a runtime-only install), after checking
# that the block is effective: transformers' own GGUF tokenizer must fail under it.
_BUILD_WITHOUT_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` now raises; find_spec("torch") is None
    gguf, out = sys.argv[1], sys.argv[2]
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(gguf.rsplit("/", 1)[0], gguf_file=gguf.rsplit("/", 1)[1])
    except Exception as e:
        print("transformers without torch:", type(e).__name__, str(e).splitlines()[0][:200])
    else:
        sys.exit("transformers built a GGUF tokenizer with torch blocked: the block is void")
    from fedlora_jax.model.tokenizer import save_gguf_tokenizer
    save_gguf_tokenizer(gguf, out)
    assert sys.modules["torch"] is None, "something replaced the torch block"
    """
)


@pytest.fixture(scope="module")
def built(smollm2_gguf: Path, tmp_path_factory) -> Path:
    """Our tokenizer files for SmolLM2, built where torch cannot be imported."""
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    run = subprocess.run(
        [sys.executable, "-c", _BUILD_WITHOUT_TORCH, str(smollm2_gguf), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "transformers without torch:" in run.stdout
    return out


@pytest.fixture(scope="module")
def ours(built: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(built))


@pytest.fixture(scope="module")
def ref(smollm2_gguf: Path):
    from transformers import AutoTokenizer  # its GGUF reader needs torch (the test extra)

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def dolly_rows() -> list[dict]:
    """200 Dolly rows spread over the whole file (every 75th), read without project code."""
    with gzip.open(DOLLY, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:: len(rows) // 200][:200]


def test_saved_files_are_transformers_tokenizer(built: Path, ref) -> None:
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in built.iterdir()
    }
    assert json.loads((built / "tokenizer.json").read_text()) == json.loads(
        ref.backend_tokenizer.to_str()
    )
    assert (built / "chat_template.jinja").read_text() == ref.chat_template


def test_special_tokens_match(ours, ref) -> None:
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    # the GGUF's ids (bos=1, eos=2, unk=0, pad=2) and ChatML names, by hand
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (
        1,
        2,
        0,
        2,
    )
    assert ours.add_bos_token is ref.add_bos_token is False
    assert ours.add_eos_token is ref.add_eos_token is False
    assert len(ours) == len(ref) == 49152


def test_dolly_ids_and_decode_round_trip(ours, ref, dolly_rows: list[dict]) -> None:
    texts = [r[k] for r in dolly_rows for k in ("instruction", "context", "response") if r[k]]
    texts += [  # edges: digits after runs of spaces, tabs, CRLF, non-ASCII, literal specials
        "a  1  22\t333\r\n4444",
        "naïve café — 東京 🙂",
        "  leading and trailing  ",
        "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
        "",
    ]
    assert len(texts) > 400
    ids = ours(texts)["input_ids"]
    assert ids == ref(texts)["input_ids"]
    assert sum(map(len, ids)) > 20_000  # the texts really were tokenized
    for text, row in zip(texts, ids, strict=True):
        assert ours.decode(row) == ref.decode(row) == text
        assert ours.decode(row, skip_special_tokens=True) == ref.decode(
            row, skip_special_tokens=True
        )


def test_chat_template_text_and_ids(ours, ref, dolly_rows: list[dict]) -> None:
    a, b = dolly_rows[3], dolly_rows[150]
    conversations = [
        [{"role": "user", "content": a["instruction"]}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"{b['instruction']}\n\n{b['context']}"},
            {"role": "assistant", "content": b["response"]},
        ],
        [
            {"role": "user", "content": a["instruction"]},
            {"role": "assistant", "content": a["response"]},
            {"role": "user", "content": "And in 3 words?"},
        ],
    ]
    for conv in conversations:
        for prompt in (True, False):
            text = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt)
            assert text == ref.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=prompt
            )
            got = ours.apply_chat_template(conv, tokenize=True, add_generation_prompt=prompt)
            want = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=prompt)
            assert got["input_ids"] == want["input_ids"]
            assert got["input_ids"] == ours(text)["input_ids"]
    text = ours.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(f"<|im_start|>user\n{a['instruction']}<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------ small hand-made GGUFs: hand-worked ids, errors


def tiny_gguf(path: Path, model: str = "gpt2", tokens=("a", "b", "ab", "<s>"), bos=3) -> Path:
    """A metadata-only GGUF: vocabulary a, b, ab, <s> (control), one merge "a b"."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("smollm")
    if tokens:
        w.add_token_list(list(tokens))
        w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_by_hand(tmp_path: Path) -> None:
    tok = load_gguf_tokenizer(tiny_gguf(tmp_path / "t.gguf"))
    assert tok("abab<s>ab")["input_ids"] == [2, 2, 3, 2]  # merge a+b; <s> kept whole
    assert tok.bos_token == "<s>" and tok.eos_token is None
    assert tok.decode([2, 0, 3], skip_special_tokens=True) == "aba"


def test_bad_gguf_tokenizers_say_what_and_where(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(TokenizerLoadError, match=r"t1.gguf: tokenizer.ggml.bos_token_id=9 is "):
        load_gguf_tokenizer(tiny_gguf(tmp_path / "t1.gguf", bos=9))
    with pytest.raises(TokenizerLoadError, match=r"t2.gguf: no tokenizer in this GGUF"):
        load_gguf_tokenizer(tiny_gguf(tmp_path / "t2.gguf", tokens=()))
    with pytest.raises(ModelNotFoundError, match=r"none.gguf: no such GGUF file"):
        load_gguf_tokenizer(tmp_path / "none.gguf")
    # a kind only transformers' reader builds, on an install without torch
    from transformers import AutoTokenizer

    def no_torch(*args, **kwargs):
        raise ImportError("Could not import module 'read_gguf_metadata'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_torch)
    with pytest.raises(
        TokenizerLoadError,
        match=r"t3.gguf: tokenizer kind 'llama' .* needs torch .*without torch, byte-level BPE",
    ):
        load_gguf_tokenizer(tiny_gguf(tmp_path / "t3.gguf", model="llama"))
