"""Run configs: presets load, overrides are typed, mistakes are one-line errors naming the key."""

from __future__ import annotations

import json
import pathlib

import pytest

from fedlora_jax import config as config_lib
from fedlora_jax.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DOLLY = str(REPO / "configs" / "dolly.py")
NI = str(REPO / "configs" / "natural_instructions.py")


@pytest.mark.parametrize("file", [DOLLY, NI])
@pytest.mark.parametrize("preset", ["default", "smoke", "llama2-7b", "deepseek-7b"])  # + others
def test_every_preset_loads_and_validates(file: str, preset: str) -> None:
    cfg = load_config(f"{file}:{preset}")
    assert cfg.run.tag == f"{pathlib.Path(file).stem}-{preset}"
    if file == NI:
        assert (cfg.data.source, cfg.data.partition) == ("natural_instructions", "task")


def test_presets_hold_the_documented_settings() -> None:
    default = load_config(DOLLY)
    assert default.model.spec == "smollm2-135m"
    assert (default.data.source, default.data.partition, default.data.alpha) == (
        "dolly", "dirichlet", 0.5,
    )  # fmt: skip
    assert default.data.num_clients == 4 and default.data.max_seq_len == 256
    assert default.algorithm.name == "fedlora_optimizer"
    assert config_lib.adapter_kind(default) == "decomposed"
    smoke = load_config(f"{DOLLY}:smoke")
    assert (smoke.model.spec, smoke.algorithm.name) == ("stories260k", "fedit")
    paper = load_config(f"{DOLLY}:llama2-7b")
    assert paper.model.spec == "meta-llama/Llama-2-7b-hf"
    assert (paper.model.dtype, paper.adapter.r, paper.adapter.alpha) == ("bfloat16", 8, 16.0)
    assert (paper.adapter.targets, paper.optim.lr, paper.data.max_seq_len) == ("qv", 3e-4, 512)
    assert load_config(f"{DOLLY}:deepseek-7b").model.spec == "deepseek-ai/deepseek-llm-7b-base"


def test_overrides_are_parsed_to_the_key_type() -> None:
    cfg = load_config(
        f"{DOLLY}:smoke",
        [
            "federated.rounds=5",
            "optim.lr=1",  # int into a float key
            "model.remat=true",
            "model.spec=123",  # a str key keeps the raw text
            "algorithm.name=fedsa_lora",
            "algorithm.options.local_steps_b=3",  # options take any builder kwarg
        ],
    )
    assert cfg.federated.rounds == 5
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.remat is True
    assert cfg.model.spec == "123"
    assert cfg.algorithm.name == "fedsa_lora"
    assert cfg.algorithm.options.to_dict() == {"local_steps_b": 3}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federated.backend=pmap"], "federated.backend='pmap' is not valid; allowed: vmap, "),
        (["optim.schedule=step"], "optim.schedule='step' is not valid; allowed: constant, "),
        (["federated.roundz=3"], "unknown config key 'federated.roundz'; valid keys here: "),
        (["modle.spec=x"], "unknown config key 'modle'; valid keys here: adapter, algorithm"),
        (["federated.rounds=three"], "config key 'federated.rounds' expects int, got 'three'"),
        (["model.remat=maybe"], "config key 'model.remat' expects bool"),
        (["federated=3"], "config key 'federated' is a section"),
        (["federated.rounds"], "expected key=value"),
        (["federated.rounds=0"], "federated.rounds=0 is not valid; must be >= 1"),
        (["optim.lr=0"], "optim.lr=0.0 is not valid; must be > 0"),
        (["federated.client_fraction=1.5"], "client_fraction=1.5 is not valid; must be in [0, 1]"),
        (["federated.clients_per_round=9"], "exceeds data.num_clients=4"),
        (["federated.clients_per_round=2", "federated.client_fraction=0.5"], "both set"),
    ],
)
def test_mistakes_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f"{DOLLY}:smoke", overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_bad_file_and_preset_are_one_line_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"file '.*nope.py' not found"):
        load_config(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match=r"dolly.py: unknown preset 'big'; allowed: default, "):
        load_config(f"{DOLLY}:big")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(empty))


def test_config_round_trips_through_json() -> None:
    cfg = load_config(f"{DOLLY}:smoke", ["algorithm.options.e_local=2", "optim.lr=0.01"])
    saved = json.loads(json.dumps(config_lib.to_dict(cfg)))
    back = config_lib.from_dict(saved)
    assert config_lib.to_dict(back) == config_lib.to_dict(cfg)
    with pytest.raises(ConfigError, match="unknown config key 'federated.bogus'"):
        config_lib.from_dict({"federated": {"bogus": 1}})


def test_run_name_is_derived_unless_given() -> None:
    cfg = load_config(f"{DOLLY}:smoke", ["run.seed=3", "algorithm.name=fedsa_lora"])
    assert config_lib.run_name(cfg) == "dolly-smoke-fedsa_lora-seed3"
    cfg.run.name = "mine"
    assert config_lib.run_name(cfg) == "mine"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("fedit", "lora"), ("fedlora_optimizer", "decomposed"), ("fedalt", "mixture"),
     ("fedgalore", "dense_delta")],
)  # fmt: skip
def test_adapter_kind_auto_follows_the_algorithm(name: str, kind: str) -> None:
    cfg = load_config(f"{DOLLY}:smoke", [f"algorithm.name={name}"])
    assert cfg.adapter.kind == "auto"
    assert config_lib.adapter_kind(cfg) == kind
    cfg.adapter.kind = "lora"
    assert config_lib.adapter_kind(cfg) == "lora"


def test_data_keys_are_checked_by_the_data_module() -> None:
    with pytest.raises(ValueError, match=r"data.partition='zipf': allowed values are iid, "):
        load_config(f"{DOLLY}:smoke", ["data.partition=zipf"])
    cfg = load_config(f"{DOLLY}:smoke", ["data.source=path", "data.fields.response=output"])
    assert cfg.data.fields.to_dict() == {"response": "output"}
