"""docs/writing_an_algorithm.md stays true: its example algorithm and its aggregate test run."""

from __future__ import annotations

import pathlib
import re

from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, base
from fedlora_jax.model.config import LlamaConfig

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "writing_an_algorithm.md"


def test_example_algorithm_and_its_aggregate_test_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    algorithm, test = blocks[0], blocks[2]
    model = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )
    ns: dict = {"training": ClientTraining(model=model, adapter=AdapterConfig(r=2))}
    try:
        exec(compile(algorithm, str(DOC), "exec"), ns)
        exec(compile(test, str(DOC), "exec"), ns)
        ns["test_fedavgm_aggregate"]()
        assert base.get("fedavgm") is ns["fedavgm"]
    finally:
        base._REGISTRY.pop("fedavgm", None)
