"""The README's method table: every registered algorithm, what it shares and keeps, and its
per-client bytes per round for LLaMA-2-7B, LoRA r=8 on q,v — from the engine's own communication
accounting (``engine.comm_bytes``) traced on the 7B shapes, so no weights are needed.

    python scripts/method_table.py            # prints the markdown table
    python scripts/method_table.py --readme   # and writes it between the README's markers
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedlora_jax.adapters import AdapterConfig  # noqa: E402
from fedlora_jax.algorithms import ClientTraining, RoundInfo, get, names  # noqa: E402
from fedlora_jax.algorithms.base import keys_placed  # noqa: E402
from fedlora_jax.algorithms.rank_mask import RankedClients  # noqa: E402
from fedlora_jax.config import ALGORITHM_KINDS  # noqa: E402
from fedlora_jax.federated import engine as E  # noqa: E402
from fedlora_jax.model.config import LlamaConfig  # noqa: E402
from fedlora_jax.model.llama import init_random_base  # noqa: E402

# meta-llama/Llama-2-7b-hf config.json, transcribed
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)  # fmt: skip
NUM_CLIENTS, STEPS, BATCH, SEQ = 8, 10, 1, 8  # batch and sequence shapes do not change bytes


def training_for(name: str, model: LlamaConfig = LLAMA2_7B, r: int = 8) -> ClientTraining:
    adapter = AdapterConfig(kind=ALGORITHM_KINDS.get(name, "lora"), r=r, alpha=2.0 * r,
                            targets="qv")  # fmt: skip
    return ClientTraining(model=model, adapter=adapter, local_steps=STEPS)


def round_bytes(name: str, model: LlamaConfig = LLAMA2_7B, r: int = 8) -> tuple[int, int, str]:
    """(down, up, note) bytes per client per round of ``name`` with its default options, from
    the engine's accounting on the traced payload and upload. ``note`` flags what only a run
    refines: ``rank`` (clients report per-client ranks: the run counts those, this is the full
    r) and ``held`` (a phase whose payload the previous round's clients already hold)."""
    alg = get(name)(training_for(name, model, r))
    base = jax.eval_shape(lambda: init_random_base(jax.random.key(0), model, jnp.bfloat16))
    n = 1 if alg.pooled_data else NUM_CLIENTS
    server, clients = jax.eval_shape(lambda: alg.init(jax.random.PRNGKey(0), base, n))
    ids = np.zeros((1,), np.int32)
    config = E.EngineConfig(rounds=10)
    down = up = 0
    notes = set()
    for p, phase in enumerate(alg.phases):
        shape = (1, phase.steps, BATCH, SEQ)
        batches = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in E.BATCH_KEYS}
        args = (base, server, clients, ids, batches, jax.random.PRNGKey(0), np.int32(0),
                np.int32(p), np.ones((1,), np.float32))  # fmt: skip
        d, u = E.comm_bytes(alg, p, config, n, *args)
        down, up = down + d, up + u
        metrics = jax.eval_shape(E._phase_core(phase, config, n), *args)[2]
        if any("_rank/" in key for key in metrics):
            notes.add("rank")
        if getattr(phase, "payload_held", False):
            notes.add("held")
    if alg.pooled_data:
        return 0, 0, ""
    return int(down), int(up), ", ".join(sorted(notes))


def placement_summary(name: str) -> tuple[str, str, str]:
    """(shared, personal, personal model) from the placement spec and the Models flag."""
    alg = get(name)(training_for(name, LLAMA2_7B))
    by_phase = [(ph.name, ph.placement) for ph in alg.phases]

    def listed(*where: str) -> str:
        parts = []
        for phase, placement in by_phase:
            keys = keys_placed(placement, *where)
            if keys:
                prefix = f"{phase}: " if len(by_phase) > 1 else ""
                parts.append(prefix + ", ".join(keys))
        return "; ".join(parts) or "—"

    base = jax.eval_shape(lambda: init_random_base(jax.random.key(0), LLAMA2_7B, jnp.bfloat16))
    n = 1 if alg.pooled_data else NUM_CLIENTS
    server, clients = jax.eval_shape(lambda: alg.init(jax.random.PRNGKey(0), base, n))
    info = RoundInfo(jnp.int32(0), jax.random.key(0), 10, n)
    models = jax.eval_shape(lambda s, c: alg.models(s, c, info), server, clients)
    if models.personal is None:
        own = "= global"
    elif isinstance(clients, RankedClients) and listed("personal") == "—":
        own = "= global, at the client's rank"
    elif models.global_ is None:
        own = "own (no global model)"
    else:
        own = "own"
    return listed("shared"), listed("personal"), own


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def table() -> str:
    rows = [
        "| method | shared (uploaded) | personal (kept) | personal model | up / client / round "
        "| down / client / round | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names():
        down, up, note = round_bytes(name)
        shared, personal, own = placement_summary(name)
        if personal == "—" and own == "own":
            personal = "a whole adapter copy (client state)"
        rows.append(
            f"| `{name}` | {shared} | {personal} | {own} | {mb(up)} | {mb(down)} | {note} |"
        )
    rows.append(
        "\nNote `rank`: the clients report per-client ranks and a run counts each client's "
        "(e.g. RoLoRA sends one factor a round); the table counts the full traced payload. "
        "`held`: a run does not count a phase's download the client already holds."
    )
    return "\n".join(rows)


def write_readme(text: str, path: pathlib.Path = REPO / "README.md") -> None:
    start, end = "<!-- method-table:start -->", "<!-- method-table:end -->"
    readme = path.read_text()
    if start not in readme or end not in readme:
        raise SystemExit(f"error: {path} lacks the markers {start} ... {end}")
    head, rest = readme.split(start, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    markdown = table()
    print(markdown)
    if "--readme" in sys.argv[1:]:
        write_readme(markdown)
