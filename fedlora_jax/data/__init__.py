"""Instruction data: sources, validation, templates, tokenisation, partitions and batches."""

from fedlora_jax.data.batches import (
    client_round_batches,
    eval_loss_batches,
    eval_prompt_batches,
    stack_clients,
)
from fedlora_jax.data.config import DataConfig
from fedlora_jax.data.partition import (
    by_category,
    by_group,
    dirichlet,
    iid,
    shepherd,
    train_test_split,
)
from fedlora_jax.data.pipeline import ClientData, EvalSplit, FederatedData, prepare_federated_data
from fedlora_jax.data.rows import DataError, Example, LoadResult
from fedlora_jax.data.sources import (
    load_dolly,
    load_instructions,
    load_natural_instructions,
    load_source,
)
from fedlora_jax.data.tables import CategoryTable, client_category_table
from fedlora_jax.data.tokenize import TokenizedSet, tokenize_examples

__all__ = [
    "CategoryTable",
    "ClientData",
    "DataConfig",
    "DataError",
    "EvalSplit",
    "Example",
    "FederatedData",
    "LoadResult",
    "TokenizedSet",
    "by_category",
    "by_group",
    "client_category_table",
    "client_round_batches",
    "dirichlet",
    "eval_loss_batches",
    "eval_prompt_batches",
    "iid",
    "load_dolly",
    "load_instructions",
    "load_natural_instructions",
    "load_source",
    "prepare_federated_data",
    "shepherd",
    "stack_clients",
    "tokenize_examples",
    "train_test_split",
]
