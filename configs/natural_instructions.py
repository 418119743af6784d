"""Natural Instructions presets (client = task).

Use ``--config configs/natural_instructions.py[:preset]``:


default      SmolLM2-135M (offline package), the 16-task subset, partitioned by task over 4
             clients, 3 rounds: sized for a 2-core CPU.
smoke        stories260K, 4 clients, 2 rounds: seconds.
llama2-7b    paper scale (GPU/TPU): Llama-2-7B, bf16, one client per task (16), r=8 alpha=16 on
             q,v, AdamW 3e-4.
deepseek-7b  the same with DeepSeek-LLM-7B-base.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from fedlora_jax.config import paper_scale_preset, pick_preset, smoke_preset


def natural_instructions(cfg: ConfigDict) -> ConfigDict:
    cfg.data.update(source="natural_instructions", partition="task")
    return cfg


PRESETS = {
    "default": natural_instructions,
    "smoke": lambda c: smoke_preset(natural_instructions(c)),
    "llama2-7b": lambda c: paper_scale_preset(
        natural_instructions(c), "meta-llama/Llama-2-7b-hf", num_clients=16
    ),
    "deepseek-7b": lambda c: paper_scale_preset(
        natural_instructions(c), "deepseek-ai/deepseek-llm-7b-base", num_clients=16
    ),
}


def get_config(preset: str = "default") -> ConfigDict:
    return pick_preset(__file__, PRESETS, preset)
