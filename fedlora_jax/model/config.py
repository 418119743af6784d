"""Architecture of a LLaMA-family causal LM, read from a Hugging Face ``config.json``.

Only architecture lives here; dtypes, remat and dropout are call-time options of ``apply`` so one
config serves fp32 tests and bf16 GPU runs alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedlora_jax.settings import Section, setting

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_parameters`` / ``rope_scaling``)."""

    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Build from a HF config dict; ``source`` names the file in error messages."""
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad or d.get("model_type", "llama") != "llama":
            raise ValueError(
                f"{source}: unsupported architecture {bad or d.get('model_type')}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama')"
            )
        heads = d["num_attention_heads"]
        # transformers 5 moves rope_theta/rope_scaling into rope_parameters; either may be None.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rtype not in ("default", "linear", "llama3"):
            raise ValueError(
                f"{source}: unsupported rope type {rtype!r}; supported: default, linear, llama3"
            )
        scaling = RopeScaling(
            rope_type=rtype,
            factor=float(rope.get("factor", 1.0) or 1.0),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", 8192)
            ),
        )
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """Inverse of ``from_hf_dict`` (for export); written in transformers-5 style."""
        rope: dict[str, Any] = {
            "rope_type": self.rope_scaling.rope_type,
            "rope_theta": self.rope_theta,
        }
        if self.rope_scaling.rope_type != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
            )
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }


# The LLaMA model's adaptable linear modules (i = layer index): ``layers.<i>.attn.<name>`` and
# ``layers.<i>.mlp.<name>``.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def linear_specs(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Every adaptable linear module as ``{dotted path: (in_features, out_features)}``, in model
    order (layer, then q, k, v, o, gate, up, down)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    dq, dkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "q_proj": (d, dq),
        "k_proj": (d, dkv),
        "v_proj": (d, dkv),
        "o_proj": (dq, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    return {path: shapes[path.rsplit(".", 1)[1]] for path in module_paths(cfg.num_layers)}


def module_paths(num_layers: int) -> list[str]:
    """The adaptable linear modules' dotted paths, in model order."""
    paths = []
    for i in range(num_layers):
        paths += [f"layers.{i}.attn.{m}" for m in ATTN_MODULES]
        paths += [f"layers.{i}.mlp.{m}" for m in MLP_MODULES]
    return paths


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    """The ``model`` section of a run config: which base model, its dtypes and remat."""

    section = "model"
    spec: str = setting(
        "smollm2-135m", "alias, local HF folder, GGUF file or hub id (model.hub.resolve_model)"
    )
    dtype: str = setting(
        "float32", "storage dtype of the frozen base weights", choices=("float32", "bfloat16")
    )
    compute_dtype: str = setting(
        "float32", "dtype of activations and matmuls", choices=("float32", "bfloat16")
    )
    remat: bool = setting(False, "recompute each layer in the backward pass (less memory)")
    remat_policy: str = setting(
        "layer",
        "what a rematerialised layer keeps: layer = nothing inside it, dots_saveable = matmul "
        "outputs (docs/model.md has the measured memory)",
        choices=("layer", "dots_saveable"),
    )

    def remat_arg(self) -> bool | str:
        """``remat`` as the model's forward takes it: False, or the policy name."""
        return self.remat and self.remat_policy
