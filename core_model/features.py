"""Public catalogue features as a matrix the model reads (``model.item_features``).

The item catalogue is public (``ARCHITECTURE.md``): an item's genres, release year, merchant or
category may be used by every party, the server included. Histories are what stays private.
:func:`catalogue_features` turns the string features an interaction log carries
(``InteractionLog.item_features``, e.g. ``"genres"`` = ``"Action|Comedy"``, ``"year"`` =
``"1995"``, ``"category"`` = ``"cat-03"``) into a fixed (num_items + 1, F) float matrix:

* each named feature is categorical; a value is split on ``"|"`` into tokens, one column per
  distinct ``name=token`` (columns sorted, so the same catalogue always gives the same matrix);
* ``name/w`` buckets an integer feature by ``w``: ``"year/5"`` puts 1993 and 1995 in one column,
  ``year/5=1990`` (fewer columns, each shared by more items);
* an item's row holds, for each feature, ``1 / k`` in each of its ``k`` token columns (the mean of
  the token vectors, so a three-genre film is not three times as loud as a one-genre film); a
  feature an item lacks (empty value) adds nothing;
* row 0, the padding item, is zero.

The model (``core_model/model.py``) adds a learned ``F -> d`` projection of an item's row to its
id embedding on the input side and to its score on the output side. Under DP-SGD those few
``F x d`` weights are shared by every item of a genre or year, so they are learned from many users
at once, while each item's own id embedding is learned from its own users only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from core_model.config import ExperimentConfig
    from core_model.model import SASRec

FEATURES_RECORD = "catalogue-features"
"""The message record in which the server sends its clients the catalogue feature matrix."""


@dataclass(frozen=True)
class CatalogueFeatures:
    """``matrix`` (num_items + 1, F) float32 and the ``name=token`` label of each column."""

    matrix: np.ndarray
    columns: tuple[str, ...]


def catalogue_features(item_features: Mapping[str, Sequence[str]], names: Sequence[str],
                       num_items: int) -> CatalogueFeatures:
    """The feature matrix of ``names`` (see the module docstring).

    Raises ``ValueError`` naming the feature when a name is not in ``item_features`` (listing the
    ones there are), when its list is not ``num_items + 1`` long (index 0 = padding), when a name is
    repeated, or when no item has any token of the named features.
    """
    names = list(names)
    if not names:
        raise ValueError("model.item_features is empty: name at least one catalogue feature")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"model.item_features names {repeated} more than once")
    columns: list[str] = []
    blocks: list[tuple[dict[str, int], list[list[str]]]] = []  # per feature: token -> column, items' tokens
    for name in names:
        base, width = _bucketing(name)
        if base not in item_features:
            raise ValueError(f"model.item_features names {base!r}, which this catalogue does not have; "
                             f"it has {sorted(item_features) or 'no item features'}")
        values = item_features[base]
        if len(values) != num_items + 1:
            raise ValueError(f"catalogue feature {base!r} has {len(values)} entries, expected num_items + 1 = "
                             f"{num_items + 1} (index 0 is the padding item)")
        item_tokens = [[t.strip() for t in str(values[i]).split("|") if t.strip()] for i in range(num_items + 1)]
        if width:
            for i, tokens in enumerate(item_tokens[1:], start=1):
                bad = next((t for t in tokens if not re.fullmatch(r"-?\d+", t)), None)
                if bad is not None:
                    raise ValueError(f"model.item_features {name!r} buckets integers, but item {i}'s "
                                     f"{base!r} is {bad!r}")
                item_tokens[i] = [str(int(t) // width * width) for t in tokens]
        tokens = sorted({t for ts in item_tokens[1:] for t in ts}, key=lambda t: (len(t), t) if width else t)
        blocks.append(({t: len(columns) + k for k, t in enumerate(tokens)}, item_tokens))
        columns.extend(f"{name}={t}" for t in tokens)
    if not columns:
        raise ValueError(f"no item has a value for model.item_features {names}: the matrix would be all zero")
    matrix = np.zeros((num_items + 1, len(columns)), dtype=np.float32)
    for column_of, item_tokens in blocks:
        for i, tokens in enumerate(item_tokens[1:], start=1):
            distinct = set(tokens)
            for t in distinct:
                matrix[i, column_of[t]] = 1.0 / len(distinct)
    return CatalogueFeatures(matrix=matrix, columns=tuple(columns))


def _bucketing(name: str) -> tuple[str, int]:
    """``"year/5"`` -> ("year", 5); ``"genres"`` -> ("genres", 0)."""
    if "/" not in name:
        return name, 0
    base, _, width = name.partition("/")
    if not width.isdigit() or int(width) < 1:
        raise ValueError(f"model.item_features entry {name!r}: expected 'feature/width' with a whole width >= 1")
    return base, int(width)


def build_model(config: ExperimentConfig, num_items: int,
                item_features: Mapping[str, Sequence[str]] | np.ndarray | None = None) -> SASRec:
    """A fresh :class:`SASRec` for ``config``: with ``model.item_features`` set, its feature matrix
    comes from ``item_features`` (the catalogue's string features, or an already built matrix,
    e.g. the one the server sends its clients); without, ``item_features`` is ignored.

    Raises ``ValueError`` when the config names features and ``item_features`` is ``None``.
    """
    from core_model.model import SASRec

    names = config.model_config(num_items).item_feature_names
    if not names:
        return SASRec(config.model_config(num_items))
    if item_features is None:
        raise ValueError(f"model.item_features={config.model['item_features']!r} needs the catalogue's item "
                         "features, and none were given")
    if isinstance(item_features, np.ndarray):
        matrix = item_features.astype(np.float32, copy=False)
        if matrix.ndim != 2:
            raise ValueError(f"item feature matrix must be 2-D (num_items + 1, F), got shape {matrix.shape}")
    else:
        matrix = catalogue_features(item_features, names, num_items).matrix
    model = SASRec(config.model_config(num_items, num_item_features=int(matrix.shape[1])))
    model.set_item_features(matrix)
    return model
