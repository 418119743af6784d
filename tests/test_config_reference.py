"""docs/config.md is the generated reference of the current config schema and algorithm options."""

from __future__ import annotations

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_config_reference_page_is_current():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.reference()
    backend = next(line for line in text.splitlines() if line.startswith("| `federated.backend`"))
    assert "| vmap, chunked, shard_map, mesh, debug |" in backend
    lr = next(line for line in text.splitlines() if line.startswith("| `optim.lr`"))
    assert (
        lr == "| `optim.lr` | `0.0003` | float | > 0 | peak learning rate of the client optimizer |"
    )
    assert "| `fedprox` | `mu` | `0.01` | `float` |" in text
    assert (REPO / "docs" / "config.md").read_text() == text, "run scripts/config_reference.py"
