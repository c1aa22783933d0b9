"""pyproject.toml's [tool.flwr.app.config] declares every setting with the dataclasses' default."""

from __future__ import annotations

import tomllib
from pathlib import Path

from core_model.config import ExperimentConfig, config_from_run_config, flwr_app_config

ROOT = Path(__file__).resolve().parents[1]


def flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def test_pyproject_declares_every_setting_with_its_default():
    declared = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    expected = flwr_app_config()
    assert sorted(set(expected) - set(declared)) == [], "settings missing from [tool.flwr.app.config]"
    assert sorted(set(declared) - set(expected)) == [], "[tool.flwr.app.config] declares unknown settings"
    wrong = {k: (declared[k], expected[k]) for k in expected if declared[k] != expected[k]}
    assert wrong == {}, "pyproject default != dataclass default: (pyproject, dataclass)"


def test_the_declared_run_config_parses_to_the_defaults():
    declared = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    parsed = config_from_run_config(declared)
    assert parsed.train == ExperimentConfig().train and parsed.federation == ExperimentConfig().federation
    assert parsed.model_config(10) == ExperimentConfig().model_config(10)
