"""The PyTorch + PEFT reference round, the OpenFedLLM pattern (Ye et al. 2024, ``main_sft.py``).

One PEFT model is shared by all clients; each sampled client in turn gets the global adapter
loaded into it (``set_peft_model_state_dict``), trains ``steps`` steps with a fresh
``torch.optim.AdamW``, and its adapter state is saved (``get_peft_model_state_dict`` +
deepcopy); the server then takes the data-weighted FedAvg. We replace OpenFedLLM's HF ``Trainer``
by a plain training loop with the same optimizer, clipping and loss, which only removes overhead
from the reference (a stronger baseline, not a weaker one).

Run as a cell (no JAX imported, so its memory is torch's own):

    python benchmarks/torch_reference.py --cell spec.json --result result.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from typing import Any

import bench_measure as measure
import bench_weights as weights
import numpy as np
import torch

HF_GROUP = {"attn": "self_attn", "mlp": "mlp"}


def build_model(hf: dict[str, Any], seed: int, dtype: torch.dtype, device: str) -> Any:
    """``LlamaForCausalLM`` holding the benchmark's random base (``weights.random_leaves``)."""
    import transformers

    config = transformers.LlamaConfig(**hf)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, x: np.ndarray) -> None:
        tensors[name] = torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)

    for path, x in weights.random_leaves(hf, seed):
        if path == ("embed",):
            put("model.embed_tokens.weight", x)
        elif path == ("norm",):
            put("model.norm.weight", x)
        elif path == ("lm_head",):
            put("lm_head.weight", x.T)
        elif path[1].endswith("norm"):
            hf_norm = {
                "input_norm": "input_layernorm",
                "post_attn_norm": "post_attention_layernorm",
            }
            for i in range(x.shape[0]):
                put(f"model.layers.{i}.{hf_norm[path[1]]}.weight", x[i])
        else:
            group, name = HF_GROUP[path[1]], path[2]
            for i in range(x.shape[0]):  # ours [in, out] -> torch Linear [out, in]
                put(f"model.layers.{i}.{group}.{name}.weight", x[i].T)
        del x
    if hf.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True, strict=False)
    if hf.get("tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"torch reference: parameters left unset: {missing[:4]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # meta buffers -> real
    return model.to(device)


def wrap_peft(model: Any, lora: Mapping[str, Any]) -> Any:
    import peft

    cfg = peft.LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, cfg)


def masked_nll(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of token t+1 from position t over ``loss_mask[t+1]`` (our ``lm_loss`` / count)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].long())[..., 0]
    mask = loss_mask[:, 1:].to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


Steps = list[dict[str, torch.Tensor]]  # one client's steps, each {tokens, loss_mask, attn_mask}


def load_batches(path: str, device: str) -> list[Steps]:
    """Per client, its steps' batches. A fixed-shape file holds ``tokens, loss_mask, attn_mask``
    [K, S, B, T]; a ragged one (HF-collator dynamic padding: each step padded to its own longest
    example) holds ``k/s/name`` entries [B_ks, T_ks]."""
    data = np.load(path)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.int64)).to(device)

    if "tokens" in data.files:
        k, s = data["tokens"].shape[:2]
        return [
            [{n: tensor(data[n][i, j]) for n in data.files} for j in range(s)] for i in range(k)
        ]
    keys = [f.split("/") for f in data.files]
    k, s = (max(int(key[i]) for key in keys) + 1 for i in (0, 1))
    names = ("tokens", "loss_mask", "attn_mask")
    return [[{n: tensor(data[f"{i}/{j}/{n}"]) for n in names} for j in range(s)] for i in range(k)]


def train_client(model: Any, steps: Steps, hp: Mapping[str, Any]) -> None:
    """One AdamW step per batch of ``steps`` (a client's local steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=hp["weight_decay"]
    )
    model.train()
    for batch in steps:
        logits = model(input_ids=batch["tokens"], attention_mask=batch["attn_mask"])
        loss = masked_nll(logits.logits, batch["tokens"], batch["loss_mask"])
        loss.backward()
        if hp["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)


def fedavg(states: list[dict[str, torch.Tensor]], sizes: list[float]) -> dict[str, torch.Tensor]:
    """OpenFedLLM's ``global_aggregate`` for FedAvg: Σ_k n_k/n · state_k."""
    total = float(sum(sizes))
    return {
        name: sum(s[name] * (n / total) for s, n in zip(states, sizes, strict=True))
        for name in states[0]
    }


def run_round(
    model: Any,
    global_state: dict[str, torch.Tensor],
    batches: list[Steps],
    sizes: list[float],
    hp: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """One round over all K clients (``load_batches``); returns the new global."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    local_states = []
    for k in range(len(sizes)):
        set_peft_model_state_dict(model, global_state)
        train_client(model, batches[k], hp)
        local_states.append(copy.deepcopy(get_peft_model_state_dict(model)))
    return fedavg(local_states, sizes)


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Time 1 + ``spec["rounds"]`` rounds; memory over the steady rounds only."""
    device = "cuda" if spec["device"] == "gpu" else "cpu"
    measure.pin_threads(spec.get("threads"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    model = wrap_peft(build_model(spec["hf"], spec["seed"], dtype, device), spec["lora"])
    if spec.get("remat"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    batches = load_batches(spec["batches"], device)
    init = np.load(spec["init_adapters"])
    state = {"global": {n: torch.from_numpy(init[n]).to(device) for n in init.files}}
    sizes = [float(s) for s in spec["sizes"]]
    cuda = device.startswith("cuda")

    def one_round() -> None:
        state["global"] = run_round(model, state["global"], batches, sizes, spec["hp"])
        if cuda:
            torch.cuda.synchronize()
        if spec.get("check_out") and "round1" not in state:
            state["round1"] = True
            np.savez(
                spec["check_out"],
                **{n: v.detach().float().cpu().numpy() for n, v in state["global"].items()},
            )

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            measure.reset_peak_rss()

    timing = measure.time_rounds(one_round, spec["rounds"], after_first=reset_peak)
    peak = torch.cuda.max_memory_allocated() if cuda else measure.peak_rss_bytes()
    return {**timing, "peak_bytes": peak, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", required=True, help="cell spec JSON (written by federated_round.py)")
    p.add_argument("--result", required=True, help="where to write the result JSON")
    args = p.parse_args(argv)
    measure.write_json(args.result, run_cell(measure.read_json(args.cell)))


if __name__ == "__main__":
    sys.exit(main())
