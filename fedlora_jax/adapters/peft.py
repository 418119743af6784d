"""PEFT interop: write and read LoRA adapters in Hugging Face PEFT's on-disk format.

``export_peft`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` that
``peft.PeftModel.from_pretrained(hf_model, out_dir)`` loads; ``decomposed`` exports its
materialised A, B. ``load_peft`` reads such a folder back as a ``lora`` tree. Neither needs torch
or the peft package.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from fedlora_jax.adapters.base import (
    TARGET_PRESETS,
    AdapterConfig,
    get_path,
    select_targets,
    set_path,
)
from fedlora_jax.adapters.tree import Tree, leaf_paths, materialize
from fedlora_jax.model.config import LlamaConfig, linear_specs

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_HF_GROUP = {"attn": "self_attn", "mlp": "mlp"}
_OUR_GROUP = {v: k for k, v in _HF_GROUP.items()}
_KEY_RX = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_(A|B)(?:\.default)?\.weight"
)


def hf_module_name(path: str) -> str:
    """``layers.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj`` (HF LlamaForCausalLM)."""
    _, i, group, name = path.split(".")
    return f"model.layers.{i}.{_HF_GROUP[group]}.{name}"


def export_peft(
    tree: Tree,
    adapter_cfg: AdapterConfig,
    model_cfg: LlamaConfig,
    out_dir: str | pathlib.Path,
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Write the adapter as a PEFT LoRA folder; returns the folder."""
    factors = materialize(tree, adapter_cfg)
    paths = leaf_paths(factors)
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        leaf = get_path(factors, path)
        n_in, n_out = linear_specs(model_cfg)[path]
        if leaf["A"].shape != (adapter_cfg.r, n_in) or leaf["B"].shape != (n_out, adapter_cfg.r):
            raise ValueError(
                f"adapter at {path} has A {leaf['A'].shape}, B {leaf['B'].shape}; the model needs "
                f"A ({adapter_cfg.r}, {n_in}), B ({n_out}, {adapter_cfg.r})"
            )
        prefix = f"base_model.model.{hf_module_name(path)}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(leaf["A"], np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(leaf["B"], np.float32)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapter_cfg.r,
        "lora_alpha": adapter_cfg.alpha,
        "lora_dropout": adapter_cfg.dropout,
        "target_modules": [hf_module_name(p) for p in paths],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _targets_for(paths: list[str], model_cfg: LlamaConfig | None) -> str:
    """A preset name when the paths are exactly its selection, else an exact-path regex."""
    if model_cfg is not None:
        for name in TARGET_PRESETS:
            if select_targets(model_cfg.num_layers, AdapterConfig(targets=name)) == paths:
                return name
    return "|".join(re.escape(p) for p in paths)


def _check_supported(config: dict[str, Any], source: pathlib.Path) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (need 'LORA')")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            problems.append(f"non-empty {pattern}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (need 'none')")
    if problems:
        raise ValueError(f"{source}: unsupported PEFT adapter: {'; '.join(problems)}")


def load_peft(
    in_dir: str | pathlib.Path, model_cfg: LlamaConfig | None = None
) -> tuple[Tree, AdapterConfig]:
    """Read a PEFT LoRA folder as a ``lora`` tree; with ``model_cfg``, shapes are checked."""
    folder = pathlib.Path(in_dir)
    cfg_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (a PEFT adapter folder needs {f.name})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in ("r", "lora_alpha") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{cfg_file}: not a PEFT LoRA config (no {', '.join(missing)})")
    _check_supported(config, cfg_file)
    r = int(config["r"])
    tree: Tree = {}
    for key, value in load_file(str(weights_file)).items():
        m = _KEY_RX.fullmatch(key)
        if m is None:
            raise ValueError(f"{weights_file}: tensor {key!r} is not a LLaMA LoRA A/B weight")
        i, module, which = m.groups()
        group, name = module.split(".")
        set_path(tree, f"layers.{i}.{_OUR_GROUP[group]}.{name}.{which}", jnp.asarray(value))
    paths = leaf_paths(tree)
    for path in paths:
        leaf = get_path(tree, path)
        if set(leaf) != {"A", "B"}:
            raise ValueError(f"{weights_file}: {hf_module_name(path)} lacks lora_A or lora_B")
        want_a, want_b = (r, leaf["A"].shape[1]), (leaf["B"].shape[0], r)
        if model_cfg is not None:
            n_in, n_out = linear_specs(model_cfg)[path]
            want_a, want_b = (r, n_in), (n_out, r)
        if leaf["A"].shape != want_a or leaf["B"].shape != want_b:
            raise ValueError(
                f"{weights_file}: {hf_module_name(path)} has lora_A {leaf['A'].shape}, lora_B "
                f"{leaf['B'].shape}; expected {want_a}, {want_b} (r={r})"
            )
    adapter_cfg = AdapterConfig(
        kind="lora",
        r=r,
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=_targets_for(paths, model_cfg),
    )
    return tree, adapter_cfg
