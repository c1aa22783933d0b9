"""Typed experiment configuration, built in one place from a TOML file and ``key=value`` overrides.

Sections and their defaults (every key is optional; unknown keys are an error)::

    [data]    kind = "synthetic"  path = ""  (+ column names for kind = "interactions", min_length)
    [data.synthetic]  the fields of core_model.synthetic.SyntheticConfig
    [model]   the fields of core_model.model.ModelConfig except num_items (taken from the data)
    [train]   the fields of core_model.train.TrainConfig
    [eval]    exclude_history = true  sampled = true  seed = 0

Overrides use dotted keys with TOML values: ``train.lr=2e-3``, ``data.kind="ml-1m"`` (strings may
be given without quotes: ``data.kind=ml-1m``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core_model.model import ModelConfig
from core_model.train import TrainConfig

DATA_KINDS = ("synthetic", "interactions", "sasrec", "ml-1m", "ml-100k", "twitch")


@dataclass(frozen=True)
class DataConfig:
    """Where the interaction log comes from.

    ``kind="synthetic"`` generates the built-in SYNTHETIC live-commerce log (no file needed);
    every other kind reads ``path``: a file (``interactions``, ``sasrec``, ``twitch``) or a folder
    (``ml-1m``, ``ml-100k``). Column names apply to ``kind="interactions"`` (empty = absent).
    """

    kind: str = "synthetic"
    path: str = ""
    user_col: str = "user"
    item_col: str = "item"
    timestamp_col: str = ""
    event_col: str = ""
    group_col: str = ""
    min_length: int = 3
    synthetic: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.kind={self.kind!r} (a file or folder)")
        if self.min_length < 3:
            raise ValueError(f"data.min_length must be >= 3 for leave-one-out, got {self.min_length}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (see core_model.evaluate)."""

    exclude_history: bool = True
    sampled: bool = True
    seed: int = 0


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def model_config(self, num_items: int) -> ModelConfig:
        return ModelConfig.from_dict({**self.model, "num_items": num_items})

    def to_dict(self) -> dict[str, Any]:
        return {"data": asdict(self.data), "model": dict(self.model),
                "train": self.train.to_dict(), "eval": asdict(self.eval)}


def _build(cls: type, section: str, values: Mapping[str, Any], exclude: Iterable[str] = ()) -> Any:
    allowed = {f.name: f for f in fields(cls)} if cls is not dict else {}
    for name in exclude:
        allowed.pop(name, None)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}; "
                         f"[{section}] accepts {sorted(allowed)}")
    checked = dict(values)
    for name, value in values.items():
        want = str(allowed[name].type).replace(" | None", "")
        if value is None and "None" in str(allowed[name].type):
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": is_number, "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(want, True)
        if not ok:
            raise ValueError(f"{section}.{name} must be {want}, got {value!r}")
        if want == "float":
            checked[name] = float(value)
    return cls(**checked)


def build_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping (as read from TOML) into an :class:`ExperimentConfig`."""
    unknown = sorted(set(values) - {"data", "model", "train", "eval"})
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected data, model, train, eval")
    for section in ("data", "model", "train", "eval"):
        if not isinstance(values.get(section, {}), Mapping):
            raise ValueError(f"[{section}] must be a table, got {values[section]!r}")
    data_values = dict(values.get("data", {}))
    synthetic = data_values.pop("synthetic", {})
    if synthetic:
        from core_model.synthetic import SyntheticConfig
        _build(SyntheticConfig, "data.synthetic", synthetic)  # validate now, not at load time
    model_values = dict(values.get("model", {}))
    _build(ModelConfig, "model", {"num_items": 1, **model_values})  # validate all but num_items
    if "num_items" in model_values:
        raise ValueError("model.num_items is taken from the data; do not set it")
    return ExperimentConfig(
        data=DataConfig(**{**asdict(_build(DataConfig, "data", data_values)), "synthetic": dict(synthetic)}),
        model=model_values,
        train=_build(TrainConfig, "train", dict(values.get("train", {}))),
        eval=_build(EvalConfig, "eval", dict(values.get("eval", {}))),
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-3"`` -> (["train", "lr"], 0.002); bare words are strings."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read an optional TOML file, apply ``key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return build_config(values)
