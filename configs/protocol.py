"""Reproduction grids for ``scripts/reproduce.py --grid configs/protocol.py:<preset>``
(docs/protocol.md).

cpu    the reduced CPU protocol of docs/reproduction.md: SmolLM2-135M, 4 clients, 2 rounds x 2
       client steps x 1 packed row of 128 tokens, 3 seeds, Dolly Dirichlet(0.1) and (0.5) and
       NI one task per client, FedIT / FedLoRA-Optimizer (budget-matched) / FedALT / FedGaLore,
       two learning rates per method chosen on the validation split.
gpu    the GPU protocol (one accelerator; not yet run): the same settings with 8 clients,
       10 rounds x 10 client steps x 8 rows of 512 tokens, 5 seeds, three lrs per method.
tiny   stories260K, one setting, FedIT and FedLoRA-Optimizer, 2 seeds: what the test runs.

Every method of a grid trains the same client steps and rows per round: FedLoRA-Optimizer's
global and personal phases split ``federated.local_steps`` (E_g + E_l = the budget;
``fedlora_optimizer`` without these options is the unmatched variant, 2x the steps).
"""

from __future__ import annotations

from fedlora_jax.protocol import Grid, Method, Setting

# Shipped NI tasks, one per client: the first n for n clients (the order mixes the categories;
# the 8 are configs/natural_instructions.py's FEDALT_TASKS).
NI_TASKS = (
    "task003_mctaco_question_generation_event_duration",  # question_generation
    "task024_cosmosqa_answer_generation",  # answer_generation
    "task022_cosmosqa_passage_inappropriate_binary",  # classification
    "task039_qasc_find_overlapping_words",  # verification
    "task005_mctaco_wrong_answer_generation_event_duration",  # incorrect_answer_generation
    "task033_winogrande_answer_generation",  # answer_generation
    "task050_multirc_answerability",  # classification
    "task034_winogrande_question_modification_object",  # text_modification
)


def methods(
    local_steps: int, lrs: tuple[float, ...], galore_lrs: tuple[float, ...]
) -> tuple[Method, ...]:
    """The compared methods on one budget; FedLoRA-Optimizer splits it E_g = local_steps − E_l,
    E_l = local_steps // 2. The LoRA methods share ``lrs``; FedGaLore, whose Adam steps move
    the full q/v weights (x galore_scale 0.25), gets its own ``galore_lrs``."""
    e_l = local_steps // 2
    return (
        Method("fedit", ("algorithm.name=fedit",), lrs),
        Method(
            "fedlora_optimizer",
            (
                "algorithm.name=fedlora_optimizer",
                f"algorithm.options.global_steps={local_steps - e_l}",
                f"algorithm.options.local_steps_personal={e_l}",
            ),
            lrs,
        ),
        Method("fedalt", ("algorithm.name=fedalt",), lrs),
        Method(
            "fedgalore",
            (
                "algorithm.name=fedgalore",
                "algorithm.options.targets=adapter",  # the LoRA methods' modules (q, v)
                "algorithm.options.ajive_samples=100",  # 1000 needs 33 GB on SmolLM2 (OOM)
            ),
            galore_lrs,
        ),
    )


def settings(num_clients: int) -> tuple[Setting, ...]:
    """Dolly Dirichlet(0.1) first (the strong non-IID claim), then NI, then Dirichlet(0.5)."""
    dolly = "configs/dolly.py:default"
    return (
        Setting("dolly-dir0.1", dolly, ("data.alpha=0.1",), "Dirichlet α = 0.1", True),
        Setting(
            "ni-task",
            "configs/natural_instructions.py:default",
            ("data.partition=by_task", f"data.include={','.join(NI_TASKS[:num_clients])}"),
            "one NI task per client",
        ),
        Setting("dolly-dir0.5", dolly, ("data.alpha=0.5",), "Dirichlet α = 0.5"),
    )


CPU_NOTES = (
    "**A reduced protocol.** 2 rounds x 2 client steps x 1 packed row of at most 128 tokens "
    "per client is 512 token slots per client in all: far below the papers' budgets (e.g. "
    "20 rounds x 10 steps x 16 rows of 512 tokens). A verdict here says what such short runs "
    "of SmolLM2-135M show, not what the papers' runs would; the evaluation scores 2 test rows "
    "per client (loss, and ROUGE-L on 8 new tokens) and the lr sweep 2 validation rows per "
    "client. The settings run in the order listed; cells not finished in the time this "
    "machine allowed are marked not run. The GPU "
    "protocol is one command, `python scripts/reproduce.py --grid configs/protocol.py:gpu "
    "--out runs/reproduce/gpu --report docs/reproduction_gpu.md` (8 clients, 10 rounds x 10 "
    "steps x 8 rows of 512 tokens, 5 seeds, 3 lrs per method); it has not been run (no "
    "accelerator was lent to this task)."
)


def cpu() -> Grid:
    common = (
        "model.spec=smollm2-135m", "model.remat=True", "data.num_clients=4",
        "data.max_seq_len=128", "data.test_cap=4", "data.val_fraction=0.05",
        "federated.rounds=2", "federated.local_steps=2", "federated.batch_size=1",
        "eval.every=0", "eval.max_examples_per_client=2", "eval.max_new_tokens=8",
        "checkpoint.every=0", "run.on_no_valid_client=continue",
    )  # fmt: skip
    return Grid(
        "cpu",
        methods(2, (1e-3, 3e-3), (1e-4, 1e-3)),
        settings(4),
        seeds=(0, 1, 2),
        common=common,
        description="reduced CPU protocol (2-core machine shared by several people)",
        notes=CPU_NOTES,
    )


def gpu() -> Grid:
    common = (
        "model.spec=smollm2-135m", "data.num_clients=8", "data.max_seq_len=512",
        "data.test_cap=50", "data.val_fraction=0.05",
        "federated.rounds=10", "federated.local_steps=10", "federated.batch_size=8",
        "eval.every=0", "eval.max_examples_per_client=50", "eval.max_new_tokens=64",
        "eval.batch_size=32", "checkpoint.every=5", "run.on_no_valid_client=continue",
    )  # fmt: skip
    return Grid(
        "gpu",
        methods(10, (3e-4, 1e-3, 3e-3), (3e-5, 1e-4, 3e-4)),
        settings(8),
        seeds=(0, 1, 2, 3, 4),
        common=common,
        description="GPU protocol (one accelerator)",
    )


def tiny() -> Grid:
    common = (
        "model.spec=stories260k", "model.remat=False", "data.num_clients=2",
        "data.max_seq_len=128", "data.test_cap=4", "data.val_fraction=0.05",
        "federated.rounds=1", "federated.local_steps=2", "federated.batch_size=2",
        "eval.every=0", "eval.max_examples_per_client=2", "eval.max_new_tokens=4",
        "eval.batch_size=4", "checkpoint.every=0",
    )  # fmt: skip
    return Grid(
        "tiny",
        methods(2, (1e-3, 3e-3), (1e-3,))[:2],
        (Setting("dolly-dir0.5", "configs/dolly.py:smoke", ("data.alpha=0.5",), "α = 0.5"),),
        seeds=(0, 1),
        common=common,
        description="stories260K smoke grid (tests)",
    )


GRIDS = {"cpu": cpu, "gpu": gpu, "tiny": tiny}


def get_grid(preset: str = "cpu") -> Grid:
    if preset not in GRIDS:
        raise ValueError(
            f"configs/protocol.py: unknown grid {preset!r}; allowed: {', '.join(GRIDS)}"
        )
    return GRIDS[preset]()
