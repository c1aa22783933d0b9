"""Interaction logs: reading, validation, id vocabularies and the leave-one-out split.

Every reader returns an :class:`InteractionLog`: one chronological item sequence per user,
item ids mapped to contiguous indices ``1..num_items`` (index 0 is padding), user ids mapped to
``0..num_users-1``, plus whatever side information the source has (user attributes such as a
region, per-interaction event types and groups, item titles and genres).

Bad input raises :class:`DataError`, whose message names the file and the line. Nothing is
dropped silently: every row a reader skips on purpose is counted in ``InteractionLog.report``.

The leave-one-out protocol (SASRec, Kang & McAuley 2018; BERT4Rec; Klenitskiy & Vasilev 2023):
for a user with history ``<i1, i2, i3, i4, i5>``

    train:       <i1, i2, i3>          (the model learns i2|i1, i3|i1 i2)
    validation:  <i1, i2, i3> | i4
    test:        <i1, i2, i3, i4> | i5

Users with fewer than ``min_length`` (default 3) interactions cannot be split this way; they are
removed explicitly and counted in ``LeaveOneOutSplit.report``.

Imports numpy (and the standard library) only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PAD = 0
"""Item index reserved for padding; real items are ``1..num_items``."""


class DataError(ValueError):
    """Bad input data. The message starts with ``path:line:`` (line 0 = the file as a whole)."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.reason = message
        super().__init__(f"{self.path}:{self.line}: {message}")


@dataclass(frozen=True)
class Vocabulary:
    """A bijection between raw ids (strings) and contiguous indices ``offset..offset+len-1``.

    Items use ``offset=1`` (index 0 is :data:`PAD`); users use ``offset=0``.
    """

    ids: tuple[str, ...]
    offset: int = 0
    _index: dict[str, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.offset not in (0, 1):
            raise ValueError(f"offset must be 0 or 1, got {self.offset}")
        index = {raw: k + self.offset for k, raw in enumerate(self.ids)}
        if len(index) != len(self.ids):
            seen: set[str] = set()
            dup = next(raw for raw in self.ids if raw in seen or seen.add(raw))  # type: ignore[func-returns-value]
            raise ValueError(f"vocabulary ids must be unique, {dup!r} appears more than once")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, raw_id: object) -> bool:
        return str(raw_id) in self._index

    def index(self, raw_id: object) -> int:
        """Index of ``raw_id``; ``KeyError`` naming the id when it is unknown."""
        try:
            return self._index[str(raw_id)]
        except KeyError:
            raise KeyError(f"unknown id {raw_id!r} (vocabulary of {len(self)} ids)") from None

    def raw(self, index: int) -> str:
        """Raw id of ``index``; ``IndexError`` when out of range."""
        k = int(index) - self.offset
        if not 0 <= k < len(self.ids):
            raise IndexError(
                f"index {index} out of range {self.offset}..{self.offset + len(self.ids) - 1}"
            )
        return self.ids[k]

    def to_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "offset": self.offset}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        return cls(ids=tuple(str(x) for x in data["ids"]), offset=int(data["offset"]))


@dataclass
class LoadReport:
    """What a reader did: rows read, and every row or user it removed with the reason."""

    source: str
    rows_read: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def remove(self, reason: str, count: int = 1) -> None:
        if count:
            self.removed[reason] = self.removed.get(reason, 0) + int(count)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read,
                "removed": dict(self.removed), "notes": list(self.notes)}


@dataclass
class InteractionLog:
    """Chronological item sequences, one per user, with vocabularies and side information.

    Attributes
    ----------
    name
        Human-readable name of the data set (``"ml-1m (SASRec preprocessing)"``, ``"synthetic ..."``).
    sequences
        ``sequences[u]`` is an int64 array of item indices in ``1..num_items``, oldest first.
    items, users
        Vocabularies (items with offset 1, users with offset 0).
    timestamps
        Per-interaction timestamps aligned with ``sequences`` (float64), or ``None``.
    events, event_names
        Per-interaction event codes (int64 indices into ``event_names``), or ``None``.
    interaction_groups
        Per-interaction group labels (e.g. the Twitch streamer community, a merchant), as arrays of
        str, or ``None``.
    user_attributes
        Attribute name -> per-user array of str (e.g. ``"region"``, ``"zip"``, ``"gender"``).
    item_features
        Feature name -> list indexed by item index (index 0 is the padding entry ``""``),
        e.g. ``"title"``, ``"genres"``.
    report
        What the reader read and removed.
    """

    name: str
    sequences: list[np.ndarray]
    items: Vocabulary
    users: Vocabulary
    report: LoadReport
    timestamps: list[np.ndarray] | None = None
    events: list[np.ndarray] | None = None
    event_names: tuple[str, ...] | None = None
    interaction_groups: list[np.ndarray] | None = None
    user_attributes: dict[str, np.ndarray] = field(default_factory=dict)
    item_features: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def summary(self) -> dict[str, Any]:
        lengths = np.array([len(s) for s in self.sequences]) if self.sequences else np.zeros(1)
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "seq_len_min": int(lengths.min()),
            "seq_len_mean": round(float(lengths.mean()), 1),
            "seq_len_max": int(lengths.max()),
            "report": self.report.to_dict(),
        }


@dataclass
class LeaveOneOutSplit:
    """Leave-one-out split of an :class:`InteractionLog` (see the module docstring).

    ``train[k]``, ``valid_targets[k]`` and ``test_targets[k]`` belong to user ``user_index[k]`` of
    the log the split was made from.
    """

    train: list[np.ndarray]
    valid_targets: np.ndarray
    test_targets: np.ndarray
    user_index: np.ndarray
    num_items: int
    removed_short_users: int = 0

    def __len__(self) -> int:
        return len(self.train)

    def valid_inputs(self) -> list[np.ndarray]:
        """Histories used to predict the validation targets (the training sequences)."""
        return self.train

    def test_inputs(self) -> list[np.ndarray]:
        """Histories used to predict the test targets (training sequence + validation item)."""
        return [np.append(seq, tgt) for seq, tgt in zip(self.train, self.valid_targets)]

    def subset(self, rows: Sequence[int] | np.ndarray) -> LeaveOneOutSplit:
        """The split restricted to rows ``rows`` (positions in this split, not user ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        return LeaveOneOutSplit(
            train=[self.train[r] for r in rows],
            valid_targets=self.valid_targets[rows],
            test_targets=self.test_targets[rows],
            user_index=self.user_index[rows],
            num_items=self.num_items,
            removed_short_users=0,
        )


def leave_one_out(log: InteractionLog, *, min_length: int = 3) -> LeaveOneOutSplit:
    """Split every user's sequence into train / validation target / test target.

    Users with fewer than ``min_length`` interactions are removed, counted and logged.
    """
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3 for leave-one-out, got {min_length}")
    keep = [u for u, seq in enumerate(log.sequences) if len(seq) >= min_length]
    removed = log.num_users - len(keep)
    if removed:
        logger.info("leave-one-out: removed %d of %d users with fewer than %d interactions",
                    removed, log.num_users, min_length)
    if not keep:
        raise ValueError(
            f"no user of {log.name!r} has at least {min_length} interactions; "
            "leave-one-out needs one training item plus a validation and a test target")
    seqs = [np.asarray(log.sequences[u], dtype=np.int64) for u in keep]
    return LeaveOneOutSplit(
        train=[s[:-2] for s in seqs],
        valid_targets=np.array([s[-2] for s in seqs], dtype=np.int64),
        test_targets=np.array([s[-1] for s in seqs], dtype=np.int64),
        user_index=np.array(keep, dtype=np.int64),
        num_items=log.num_items,
        removed_short_users=removed,
    )
