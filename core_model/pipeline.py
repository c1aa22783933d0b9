"""From a :class:`~core_model.config.DataConfig` to a log and its leave-one-out split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core_model.config import DataConfig
from core_model.data import InteractionLog, LeaveOneOutSplit, Vocabulary, leave_one_out

logger = logging.getLogger(__name__)


def load_log(config: DataConfig) -> InteractionLog:
    """Read (or, for ``kind="synthetic"``, generate) the interaction log ``config`` names."""
    if config.kind == "synthetic":
        from core_model.synthetic import SyntheticConfig, generate_live_commerce
        return generate_live_commerce(SyntheticConfig(**config.synthetic))
    from core_model.data import load_dataset
    options = {}
    if config.kind == "interactions":
        options = {"user_col": config.user_col, "item_col": config.item_col,
                   "timestamp_col": config.timestamp_col or None, "event_col": config.event_col or None,
                   "group_col": config.group_col or None}
    return load_dataset(config.kind, config.path, **options)


def split_log(log: InteractionLog, config: DataConfig) -> LeaveOneOutSplit:
    split = leave_one_out(log, min_length=config.min_length)
    if split.removed_short_users:
        logger.warning("%s: %d users have fewer than %d interactions and are left out of "
                       "leave-one-out training and evaluation", log.name, split.removed_short_users,
                       config.min_length)
    return split


def align_to_vocabulary(log: InteractionLog, items: Vocabulary) -> InteractionLog:
    """Re-index ``log``'s items into ``items`` (a saved model's vocabulary).

    An item the model has never seen is an error naming how many and which (the first five).
    """
    if log.items.ids == items.ids:
        return log
    mapping = np.zeros(log.num_items + 1, dtype=np.int64)
    unknown = []
    for k, raw in enumerate(log.items.ids, start=1):
        if raw in items:
            mapping[k] = items.index(raw)
        else:
            unknown.append(raw)
    if unknown:
        raise ValueError(f"{log.name}: {len(unknown)} item ids are not in the model's vocabulary "
                         f"of {len(items)} items, e.g. {unknown[:5]}")
    seqs = [mapping[s] for s in log.sequences]
    return InteractionLog(name=log.name, sequences=seqs, items=items, users=log.users, report=log.report,
                          timestamps=log.timestamps, events=log.events, event_names=log.event_names,
                          interaction_groups=log.interaction_groups, user_attributes=log.user_attributes,
                          item_features={})


def read_catalogue(path: str | Path) -> Vocabulary:
    """The public item catalogue: one raw item id per line, line k = item index k (1-based)."""
    if not str(path):
        raise ValueError("data.catalogue is empty: a deployment needs the public item catalogue "
                         "(one item id per line) on the server and on every node")
    ids = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    if any(not raw for raw in ids):
        blank = ids.index("") + 1
        raise ValueError(f"{path}:{blank}: empty item id in the catalogue")
    if not ids:
        raise ValueError(f"{path}:0: the item catalogue is empty")
    return Vocabulary(tuple(ids), offset=1)


def write_catalogue(items: Vocabulary, path: str | Path) -> None:
    """Write ``items`` as a catalogue file (see :func:`read_catalogue`)."""
    Path(path).write_text("".join(f"{raw}\n" for raw in items.ids), encoding="utf-8")
