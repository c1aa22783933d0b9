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
removed explicitly and counted in ``LeaveOneOutSplit.removed_short_users``.

Readers (:func:`load_dataset` dispatches on a kind name):

* :func:`read_sasrec_pairs` -- ``user item`` lines, file order = time order (SASRec, BERT4Rec);
* :func:`read_interactions` -- generic CSV / TSV / Parquet logs with configurable columns;
* :func:`read_movielens_1m` -- SASRec's ML-1M sequences joined to the raw users and movies
  (zip-code regions), item index == SASRec item id;
* :func:`read_movielens_100k` -- raw ML-100K, sequences sorted by timestamp;
* :func:`read_twitch` -- the Twitch viewing log (Rappaz et al., RecSys 2021).

Orders are deterministic: per-user sequences are sorted by timestamp *stably* (equal
timestamps keep file order), and vocabularies are sorted numerically when every id is an
integer, lexicographically otherwise (so SASRec item ``k`` is index ``k``). Raw ids are strings.

Imports numpy (and the standard library) only; Parquet support imports pyarrow when used.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
        # Raw ids are strings by contract; accept any sequence and store a tuple of str.
        object.__setattr__(self, "ids", tuple(str(raw) for raw in self.ids))
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


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

PathLike = str | os.PathLike[str]

DATASET_KINDS: tuple[str, ...] = ("interactions", "sasrec", "ml-1m", "ml-100k", "twitch")
"""Values of ``kind`` accepted by :func:`load_dataset`."""

OTHER_REGION = "other"
"""Region of a user whose zip code does not start with a digit (e.g. Canadian postal codes)."""

_UINT = re.compile(r"\+?[0-9]{1,18}")
_INT = re.compile(r"[+-]?[0-9]{1,18}")
_BLANK_LINE = re.compile(r"(?:^|\n)[ \t\f\v]*(?:\n|$)")
_FORMATS = {"csv": ",", "tsv": "\t", "parquet": None}
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def region_of_zip(zip_code: str) -> str:
    """``"0"``..``"9"``: the first character of a US zip code; :data:`OTHER_REGION` otherwise.

    The first zip digit is the US Postal Service "national area" (0 = New England ...
    9 = the West Coast, Alaska, Hawaii), the natural one-client-per-region split of MovieLens.
    """
    zip_code = zip_code.strip()
    return zip_code[0] if zip_code[:1].isascii() and zip_code[:1].isdigit() else OTHER_REGION


# -- files -------------------------------------------------------------------------------------


def _read_text(path: PathLike, *, encoding: str = "utf-8") -> str:
    """The whole (optionally gzip-compressed) file as text with ``\\n`` line ends.

    A missing file, a bad gzip stream or bytes that do not decode raise :class:`DataError`
    (decode errors name the line).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(path, 0, "file not found")
    if p.is_dir():
        raise DataError(path, 0, "is a directory; expected a file")
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as f:
                data = f.read()
        else:
            data = p.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(path, 0, f"cannot read the file: {exc}") from exc
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(path, line, f"bytes that are not valid {encoding}: {exc.reason}") from exc
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _split_trailing_blank(text: str) -> tuple[str, int]:
    """``text`` without trailing whitespace, and how many blank lines that removed.

    The newline that ends the last line is not a blank line; ``"a\\n\\n"`` has one.
    """
    body = text.rstrip()
    tail = text[len(body):].split("\n")
    blank = len(tail) - 1 - (1 if len(tail) > 1 and tail[-1] == "" else 0)
    return body, blank


def _trailing_blank_reason(path: PathLike) -> str:
    return f"blank lines at the end of {Path(path).name}"


def _find_file(directory: Path, candidates: Sequence[str]) -> Path:
    """The first of ``candidates`` (paths relative to ``directory``) that exists."""
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise DataError(directory, 0, f"no file {' or '.join(map(repr, candidates))} in the folder")


def _check_directory(directory: PathLike) -> Path:
    d = Path(directory)
    if not d.exists():
        raise DataError(directory, 0, "folder not found")
    if not d.is_dir():
        raise DataError(directory, 0, "is not a folder; expected the data set's folder")
    return d


def _read_int_table(path: PathLike, columns: Sequence[str],
                    report: LoadReport | None = None) -> np.ndarray:
    """Whitespace-separated non-negative integers, ``len(columns)`` per line -> ``(rows, cols)``.

    Row ``r`` of the result is line ``r + 1`` of the file. Blank lines at the end of the file are
    counted in ``report``; any other blank line, a line with the wrong number of fields or a
    field that is not a non-negative integer raises :class:`DataError` naming the line.
    Fast path: one ``numpy.loadtxt`` call; on any doubt the file is re-read line by line, which
    finds and reports the first bad line.
    """
    text = _read_text(path)
    body, trailing_blank = _split_trailing_blank(text)
    layout = " ".join(columns)
    if not body:
        raise DataError(path, 0, f"file is empty; expected lines {layout!r}")
    expected_rows = body.count("\n") + 1
    table = None
    if _BLANK_LINE.search(body) is None:
        try:
            table = np.loadtxt(io.StringIO(body), dtype=np.int64, comments=None, ndmin=2)
        except ValueError:
            table = None
        if table is not None and (table.shape != (expected_rows, len(columns))
                                  or int(table.min()) < 0):
            table = None
    if table is None:
        table = _read_int_table_slowly(path, body, columns)
    if report is not None:
        report.rows_read += int(table.shape[0])
        report.remove(_trailing_blank_reason(path), trailing_blank)
    return table


def _read_int_table_slowly(path: PathLike, body: str, columns: Sequence[str]) -> np.ndarray:
    layout = " ".join(columns)
    rows: list[list[int]] = []
    for lineno, line in enumerate(body.split("\n"), start=1):
        fields = line.split()
        if not fields:
            raise DataError(path, lineno, f"blank line; expected {layout!r} "
                            "(blank lines are allowed only at the end of the file)")
        if len(fields) != len(columns):
            raise DataError(path, lineno, f"expected {len(columns)} whitespace-separated fields "
                            f"{layout!r}, got {len(fields)}: {line.strip()!r}")
        for name, value in zip(columns, fields):
            if _UINT.fullmatch(value) is None:
                raise DataError(path, lineno,
                                f"{name} must be a non-negative integer, got {value!r}")
        rows.append([int(v) for v in fields])
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(columns))


def _read_separated_lines(path: PathLike, *, sep: str, fields: int, layout: str,
                          encoding: str, report: LoadReport) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every line of a headerless ``sep``-separated file."""
    body, trailing_blank = _split_trailing_blank(_read_text(path, encoding=encoding))
    if not body:
        raise DataError(path, 0, f"file is empty; expected lines {layout!r}")
    rows = []
    for lineno, line in enumerate(body.split("\n"), start=1):
        if not line.strip():
            raise DataError(path, lineno, f"blank line; expected {layout!r} "
                            "(blank lines are allowed only at the end of the file)")
        parts = line.split(sep)
        if len(parts) != fields:
            raise DataError(path, lineno, f"expected {fields} {sep!r}-separated fields "
                            f"{layout!r}, got {len(parts)}")
        rows.append((lineno, parts))
    report.rows_read += len(rows)
    report.remove(_trailing_blank_reason(path), trailing_blank)
    return rows


def _parse_uint(path: PathLike, lineno: int, name: str, value: str) -> int:
    if _UINT.fullmatch(value.strip()) is None:
        raise DataError(path, lineno, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _table_format(path: PathLike, file_format: str | None) -> str:
    if file_format is not None:
        if file_format not in _FORMATS:
            raise DataError(path, 0, f"file_format must be one of {sorted(_FORMATS)}, "
                            f"got {file_format!r}")
        return file_format
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    ext = Path(stem).suffix
    fmt = _EXTENSIONS.get(ext)
    if fmt is None or (gz and fmt == "parquet"):
        ext += ".gz" if gz else ""
        raise DataError(path, 0, f"cannot tell the format from the extension {ext!r}; "
                        "expected .csv, .tsv or .tab (optionally .gz) or .parquet, "
                        "or pass file_format='csv' | 'tsv' | 'parquet'")
    return fmt


class _Table:
    """Selected columns of a tabular file: ``columns[name]`` is a list of values, one per data
    row, and ``lines[r]`` the 1-based line (CSV/TSV) or row number (Parquet) of row ``r``."""

    def __init__(self, columns: dict[str, list[Any]], lines: np.ndarray) -> None:
        self.columns = columns
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)


def _read_delimited(path: PathLike, *, sep: str, columns: Sequence[str], fmt: str,
                    report: LoadReport) -> _Table:
    """A CSV/TSV file with a header row; every row must have as many fields as the header."""
    text = _read_text(path, encoding="utf-8-sig")
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting,
                        strict=True)
    wanted = list(dict.fromkeys(columns))
    out: dict[str, list[str]] = {c: [] for c in wanted}
    lines: list[int] = []
    blank: list[int] = []
    end = 0  # last physical line of the previous record
    try:
        header = next(reader, None)
        end = reader.line_num
        if header is None or not "".join(header).strip():
            if header is None or not text.strip():
                raise DataError(path, 0, f"file is empty; expected a header row naming the "
                                f"columns {wanted} and one {fmt.upper()} row per interaction")
            raise DataError(path, 1, "blank line; expected the header row naming the columns")
        names = [h.strip() for h in header]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(path, 0, f"missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))}; expected columns {wanted}, "
                            f"the header has {names}")
        for c in wanted:
            if names.count(c) > 1:
                raise DataError(path, 1, f"column {c!r} appears {names.count(c)} times in the "
                                "header; expected unique column names")
        picks = [(out[c], names.index(c)) for c in wanted]
        width = len(names)
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                blank.append(start)
                continue
            if blank:
                raise DataError(path, blank[0], "blank line; expected a data row "
                                "(blank lines are allowed only at the end of the file)")
            if len(row) != width:
                raise DataError(path, start, f"expected {width} {sep!r}-separated fields "
                                f"(as many as the header), got {len(row)}")
            for values, k in picks:
                values.append(row[k])
            lines.append(start)
    except csv.Error as exc:
        raise DataError(path, end + 1, f"malformed {fmt.upper()} row: {exc}") from exc
    if not lines:
        raise DataError(path, 0, "no data rows after the header; expected one row per interaction")
    report.rows_read += len(lines)
    report.remove(_trailing_blank_reason(path), len(blank))
    return _Table(out, np.asarray(lines, dtype=np.int64))


def _read_parquet(path: PathLike, *, columns: Sequence[str], timestamp_col: str | None,
                  report: LoadReport) -> _Table:
    """Selected Parquet columns; ``lines`` are 1-based row numbers. Timestamp-typed columns
    become float seconds since the epoch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise DataError(path, 0, "file not found" if not p.exists() else "is not a file")
    wanted = list(dict.fromkeys(columns))
    try:
        names = pq.read_schema(p).names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(path, 0, f"missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))}; expected columns {wanted}, "
                            f"the file has {names}")
        table = pq.read_table(p, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, 0, f"not a readable Parquet file: {exc}") from exc
    if table.num_rows == 0:
        raise DataError(path, 0, "no rows; expected one row per interaction")
    out: dict[str, list[Any]] = {}
    for c in wanted:
        col = table.column(c).combine_chunks()
        if c == timestamp_col and pa.types.is_timestamp(col.type):
            per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[col.type.unit]
            ints = col.cast(pa.int64()).to_pylist()
            out[c] = [None if v is None else v / per_second for v in ints]
        else:
            out[c] = col.to_pylist()
        nulls = [r for r, v in enumerate(out[c]) if v is None]
        if nulls:
            raise DataError(path, nulls[0] + 1, f"column {c!r} is null; expected a value "
                            "(Parquet: line = 1-based row number)")
    report.rows_read += table.num_rows
    return _Table(out, np.arange(1, table.num_rows + 1, dtype=np.int64))


def _ids(path: PathLike, table: _Table, column: str) -> list[str]:
    """Column ``column`` as stripped, non-empty string ids."""
    values = [str(v).strip() for v in table.columns[column]]
    if "" in values:
        r = values.index("")
        raise DataError(path, int(table.lines[r]), f"empty value in column {column!r}; "
                        "expected a non-empty id")
    return values


def _floats(path: PathLike, table: _Table, column: str) -> np.ndarray:
    """Column ``column`` as finite float64 numbers."""
    values = table.columns[column]
    try:
        out = np.array(values, dtype=np.float64)
    except (ValueError, TypeError):
        out = None
    if out is None or not np.isfinite(out).all():
        for r, v in enumerate(values):
            try:
                ok = math.isfinite(float(v))
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise DataError(path, int(table.lines[r]),
                                f"column {column!r} must be a finite number, got {v!r}")
    if out is None:
        out = np.array([float(v) for v in values], dtype=np.float64)
    return out


def _uints(path: PathLike, table: _Table, column: str) -> np.ndarray:
    """Column ``column`` as non-negative int64 integers."""
    values = table.columns[column]
    bad = None
    try:
        out = np.array(values, dtype=np.int64)
        if out.size and int(out.min()) < 0:
            bad = int(np.argmax(out < 0))
    except (ValueError, TypeError, OverflowError):
        out = None
    if out is None:
        bad = next((r for r, v in enumerate(values)
                    if not isinstance(v, (int, str)) or _UINT.fullmatch(str(v).strip()) is None),
                   0)
    if bad is not None:
        raise DataError(path, int(table.lines[bad]), f"column {column!r} must be a non-negative "
                        f"integer, got {values[bad]!r}")
    return out  # type: ignore[return-value]


# -- building logs -----------------------------------------------------------------------------


def _encode(raw: Sequence[str], offset: int) -> tuple[Vocabulary, np.ndarray]:
    """Vocabulary of the distinct ``raw`` ids and the index of every entry.

    Ids are ordered numerically when every id is an integer (``"2" < "10"``; ties such as
    ``"7"`` / ``"07"`` broken by the string), lexicographically otherwise, so the order does not
    depend on the order of the rows.
    """
    first: dict[str, int] = {}
    codes = np.fromiter((first.setdefault(x, len(first)) for x in raw), dtype=np.int64,
                        count=len(raw))
    uniq = list(first)
    if all(_INT.fullmatch(x) is not None for x in uniq):
        order = sorted(range(len(uniq)), key=lambda k: (int(uniq[k]), uniq[k]))
    else:
        order = sorted(range(len(uniq)), key=uniq.__getitem__)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq), dtype=np.int64)
    return Vocabulary(tuple(uniq[k] for k in order), offset=offset), rank[codes] + offset


def _encode_ints(values: np.ndarray, offset: int) -> tuple[Vocabulary, np.ndarray]:
    """Like :func:`_encode` for integer ids (raw id = decimal string, numeric order)."""
    uniq, codes = np.unique(values, return_inverse=True)
    return (Vocabulary(tuple(str(v) for v in uniq.tolist()), offset=offset),
            codes.reshape(-1).astype(np.int64) + offset)


def _group(user_codes: np.ndarray, num_users: int, columns: Sequence[np.ndarray],
           timestamps: np.ndarray | None) -> list[list[np.ndarray]]:
    """Split aligned per-row ``columns`` into per-user arrays.

    Rows keep file order within a user; with ``timestamps`` they are sorted by time, stably
    (equal timestamps keep file order).
    """
    if timestamps is None:
        order = np.argsort(user_codes, kind="stable")
    else:
        order = np.argsort(timestamps, kind="stable")
        order = order[np.argsort(user_codes[order], kind="stable")]
    bounds = np.cumsum(np.bincount(user_codes, minlength=num_users))[:-1]
    return [np.split(col[order], bounds) for col in columns]


def _interaction_log(*, name: str, report: LoadReport, users: Vocabulary, user_codes: np.ndarray,
                     items: Vocabulary, item_codes: np.ndarray,
                     timestamps: np.ndarray | None = None,
                     events: np.ndarray | None = None, event_names: tuple[str, ...] | None = None,
                     groups: np.ndarray | None = None) -> InteractionLog:
    """Group per-row columns into an :class:`InteractionLog` (see :func:`_group`)."""
    optional = [a for a in (timestamps, events, groups) if a is not None]
    sequences, *split = _group(user_codes, len(users), [item_codes, *optional], timestamps)
    rest = iter(split)
    return InteractionLog(
        name=name, sequences=sequences, items=items, users=users, report=report,
        timestamps=next(rest) if timestamps is not None else None,
        events=next(rest) if events is not None else None,
        event_names=event_names if events is not None else None,
        interaction_groups=next(rest) if groups is not None else None,
    )


def _first_row(codes: np.ndarray, code: int) -> int:
    return int(np.argmax(codes == code))


# -- public readers ----------------------------------------------------------------------------


def read_sasrec_pairs(path: PathLike, *, name: str | None = None) -> InteractionLog:
    """Read the SASRec pair format: one ``user item`` line per interaction.

    Whitespace-separated non-negative integers; each user's lines are in chronological order
    (file order is time order; a user's lines are normally contiguous, and are grouped stably
    when they are not, with a note in the report). Plain text or ``.gz``. Raw ids are the
    decimal strings; indices follow numeric order, so for a file with items ``1..M`` and users
    ``1..N`` (the published SASRec files) item ``k`` has index ``k`` and user ``u`` index
    ``u - 1``. Blank lines at the end of the file are counted in ``report.removed``.

    Raises
    ------
    DataError
        Missing or empty file, a blank line before the end, a line without exactly two fields,
        a field that is not a non-negative integer.
    """
    report = LoadReport(source=str(path))
    table = _read_int_table(path, ("user", "item"), report)
    return _sasrec_log(path, table, report, name)


def _sasrec_log(path: PathLike, table: np.ndarray, report: LoadReport,
                name: str | None) -> InteractionLog:
    users, user_codes = _encode_ints(table[:, 0], offset=0)
    items, item_codes = _encode_ints(table[:, 1], offset=1)
    ids = table[:, 1]
    if int(ids.min()) == 1 and int(ids.max()) == len(items):
        report.notes.append(f"item ids are exactly 1..{len(items)}: item index == SASRec id")
    else:
        report.notes.append(f"item ids are not 1..{len(items)} (min {int(ids.min())}, max "
                            f"{int(ids.max())}); indices follow the numeric order of the ids")
    runs = int(np.count_nonzero(np.diff(user_codes))) + 1
    if runs != len(users):
        report.notes.append(f"the lines of some users are not contiguous ({runs} runs of "
                            f"lines for {len(users)} users); kept in file order per user")
        logger.warning("%s: %s", path, report.notes[-1])
    log = _interaction_log(name=name or Path(path).name, report=report, users=users,
                           user_codes=user_codes, items=items, item_codes=item_codes)
    logger.info("read %s: %d users, %d items, %d interactions", path, log.num_users,
                log.num_items, log.num_interactions)
    return log


def read_interactions(path: PathLike, *, user_col: str = "user", item_col: str = "item",
                      timestamp_col: str | None = None, event_col: str | None = None,
                      group_col: str | None = None, sep: str | None = None,
                      file_format: str | None = None,
                      event_names: Sequence[str] | None = None,
                      user_attribute_cols: Sequence[str] = (),
                      name: str | None = None) -> InteractionLog:
    """Read a generic interaction log: CSV, TSV (optionally ``.gz``) or Parquet.

    One row per interaction. CSV/TSV need a header row naming the columns. Ids are strings
    (any non-empty token, surrounding whitespace stripped); vocabularies are ordered
    numerically when every id is an integer, lexicographically otherwise.

    Parameters
    ----------
    path
        The file; the format comes from the extension (``.csv``, ``.tsv``/``.tab``, each
        optionally ``.gz``; ``.parquet``/``.pq``) unless ``file_format`` is given.
    user_col, item_col
        Columns holding the user and item ids.
    timestamp_col
        Optional numeric column (Parquet timestamp columns become seconds since the epoch).
        Each user's interactions are sorted by it, stably: equal timestamps keep file order.
        Without it, file order is time order.
    event_col
        Optional column of event types (``"view"``, ``"buy"``...) -> ``events`` / ``event_names``.
    group_col
        Optional column of per-interaction groups (merchant, community...) ->
        ``interaction_groups``.
    sep
        Field separator for CSV/TSV (one character); default ``","`` / tab.
    file_format
        ``"csv"``, ``"tsv"`` or ``"parquet"``; overrides the extension.
    event_names
        Order of ``event_names`` (an event not listed is an error); default: sorted.
    user_attribute_cols
        Columns holding per-user attributes (e.g. ``"region"``) -> ``user_attributes``; every
        row of a user must carry the same value.
    name
        Name of the log; default: the file name.

    Raises
    ------
    DataError
        Missing file, unknown format, empty file, missing column, a row with the wrong number of
        fields, an empty id, a non-numeric timestamp, an unknown event, a user attribute that
        changes between a user's rows.
    """
    fmt = _table_format(path, file_format)
    if sep is not None and (fmt == "parquet" or len(sep) != 1):
        raise ValueError(f"sep must be one character and is for CSV/TSV only, got {sep!r} "
                         f"for a {fmt} file")
    wanted = [c for c in (user_col, item_col, timestamp_col, event_col, group_col) if c]
    wanted += [c for c in user_attribute_cols if c not in wanted]
    report = LoadReport(source=str(path))
    if fmt == "parquet":
        table = _read_parquet(path, columns=wanted, timestamp_col=timestamp_col, report=report)
    else:
        table = _read_delimited(path, sep=sep or _FORMATS[fmt], columns=wanted, fmt=fmt,
                                report=report)
    users, user_codes = _encode(_ids(path, table, user_col), offset=0)
    items, item_codes = _encode(_ids(path, table, item_col), offset=1)
    timestamps = _floats(path, table, timestamp_col) if timestamp_col else None
    events = names = None
    if event_col:
        raw_events = _ids(path, table, event_col)
        names = tuple(event_names) if event_names is not None else tuple(sorted(set(raw_events)))
        code_of = {e: k for k, e in enumerate(names)}
        unknown = [r for r, e in enumerate(raw_events) if e not in code_of]
        if unknown:
            r = unknown[0]
            raise DataError(path, int(table.lines[r]), f"unknown event {raw_events[r]!r} in "
                            f"column {event_col!r}; expected one of {list(names)}")
        events = np.fromiter((code_of[e] for e in raw_events), dtype=np.int64,
                             count=len(raw_events))
    groups = np.array(_ids(path, table, group_col), dtype=np.str_) if group_col else None
    log = _interaction_log(name=name or Path(path).name, report=report, users=users,
                           user_codes=user_codes, items=items, item_codes=item_codes,
                           timestamps=timestamps, events=events, event_names=names,
                           groups=groups)
    for col in user_attribute_cols:
        log.user_attributes[col] = _user_attribute(path, table, col, user_codes, len(users))
    logger.info("read %s: %d users, %d items, %d interactions", path, log.num_users,
                log.num_items, log.num_interactions)
    return log


def _user_attribute(path: PathLike, table: _Table, column: str, user_codes: np.ndarray,
                    num_users: int) -> np.ndarray:
    values = [str(v).strip() for v in table.columns[column]]
    per_user: list[str | None] = [None] * num_users
    for r, (u, v) in enumerate(zip(user_codes.tolist(), values)):
        seen = per_user[u]
        if seen is None:
            per_user[u] = v
        elif seen != v:
            raise DataError(path, int(table.lines[r]), f"user attribute {column!r} changes "
                            f"from {seen!r} to {v!r}; expected one value per user")
    return np.array(per_user, dtype=np.str_)


def read_movielens_1m(directory: PathLike) -> InteractionLog:
    """MovieLens-1M as preprocessed by SASRec, joined to the raw user and movie files.

    Layout of ``directory`` (as in ``shared/data/ml-1m``):

    * ``sasrec_ml-1m.txt.gz`` (or ``sasrec_ml-1m.txt`` / ``ml-1m.txt``): the chronological
      sequences in SASRec ids, read with :func:`read_sasrec_pairs`;
    * ``ml1m_sas_to_original_users.txt`` / ``ml1m_sas_to_original_items.txt``:
      ``sas_id original_id`` per line;
    * ``raw/users.dat`` ``UserID::Gender::Age::Occupation::Zip-code`` and ``raw/movies.dat``
      ``MovieID::Title::Genres`` (latin-1); also accepted directly in ``directory``.

    Sequences and vocabularies equal those of :func:`read_sasrec_pairs` on the same file, so
    item index == SASRec item id and results are comparable with the SASRec file. The original
    MovieLens ids are in ``user_attributes["movielens_id"]`` and ``item_features["movielens_id"]``.

    ``user_attributes``: ``"zip"``, ``"region"`` (:func:`region_of_zip`; counts in
    ``report.notes``), ``"gender"``, ``"age"`` (the ML-1M age-group code), ``"occupation"``
    (code), ``"movielens_id"``. ``item_features``: ``"title"``, ``"genres"`` (``"A|B"``),
    ``"year"`` (:func:`title_year`), ``"movielens_id"``.

    Raises
    ------
    DataError
        Any file missing or malformed; a SASRec user or item without a mapping line (names the
        SASRec file and the first line of that id); a mapping to a user or movie absent from
        ``users.dat`` / ``movies.dat`` (names the mapping file and line); duplicate ids.
    """
    d = _check_directory(directory)
    seq_path = _find_file(d, ("sasrec_ml-1m.txt.gz", "sasrec_ml-1m.txt", "ml-1m.txt"))
    user_map_path = _find_file(d, ("ml1m_sas_to_original_users.txt",))
    item_map_path = _find_file(d, ("ml1m_sas_to_original_items.txt",))
    users_path = _find_file(d, ("raw/users.dat", "users.dat"))
    movies_path = _find_file(d, ("raw/movies.dat", "movies.dat"))

    report = LoadReport(source=str(seq_path))
    table = _read_int_table(seq_path, ("user", "item"), report)
    log = _sasrec_log(seq_path, table, report, "ml-1m (SASRec preprocessing)")

    aux = LoadReport(source=str(d))
    user_map = _id_mapping(user_map_path, aux)
    item_map = _id_mapping(item_map_path, aux)
    users_dat = _read_records(users_path, sep="::", fields=5, encoding="latin-1",
                              layout="UserID::Gender::Age::Occupation::Zip-code", report=aux)
    movies_dat = _read_records(movies_path, sep="::", fields=3, encoding="latin-1",
                               layout="MovieID::Title::Genres", report=aux)

    def join(vocab: Vocabulary, column: int, mapping: dict[int, tuple[int, int]],
             map_path: Path, records: dict[int, tuple[int, list[str]]],
             rec_path: Path, what: str) -> list[tuple[int, list[str]]]:
        out = []
        for raw in vocab.ids:
            sas = int(raw)
            if sas not in mapping:
                line = _first_row(table[:, column], sas) + 1
                raise DataError(seq_path, line, f"{what} {sas} has no line in {map_path.name}; "
                                f"expected 'sas_id original_id' for every SASRec {what}")
            original, map_line = mapping[sas]
            if original not in records:
                raise DataError(map_path, map_line, f"original {what} id {original} is not in "
                                f"{rec_path.name}")
            out.append((original, records[original][1]))
        return out

    user_rows = join(log.users, 0, user_map, user_map_path, users_dat, users_path, "user")
    item_rows = join(log.items, 1, item_map, item_map_path, movies_dat, movies_path, "item")
    zips = [fields[4].strip() for _, fields in user_rows]
    log.user_attributes = {
        "zip": np.array(zips, dtype=np.str_),
        "region": np.array([region_of_zip(z) for z in zips], dtype=np.str_),
        "gender": np.array([f[1].strip() for _, f in user_rows], dtype=np.str_),
        "age": np.array([f[2].strip() for _, f in user_rows], dtype=np.str_),
        "occupation": np.array([f[3].strip() for _, f in user_rows], dtype=np.str_),
        "movielens_id": np.array([str(o) for o, _ in user_rows], dtype=np.str_),
    }
    log.item_features = {
        "title": [""] + [f[1] for _, f in item_rows],
        "genres": [""] + [f[2].strip() for _, f in item_rows],
        "year": [""] + [title_year(f[1]) for _, f in item_rows],
        "movielens_id": [""] + [str(o) for o, _ in item_rows],
    }
    _merge_removed(report, aux)
    report.notes.append(_region_note(log.user_attributes["region"]))
    report.notes.append(f"joined {len(user_rows)} users to {users_path.name} and "
                        f"{len(item_rows)} items to {movies_path.name}; "
                        f"{len(movies_dat) - len(item_rows)} movies of {movies_path.name} "
                        "are not in the SASRec file (fewer than 5 ratings)")
    return log


_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def title_year(title: str) -> str:
    """The release year a MovieLens title ends with (``"Heat (1995)"`` -> ``"1995"``); ``""`` if none."""
    found = _TITLE_YEAR.search(title)
    return found.group(1) if found else ""


def _id_mapping(path: Path, report: LoadReport) -> dict[int, tuple[int, int]]:
    """``sas_id -> (original_id, line)`` from a ``sas_id original_id`` file; both sides unique."""
    table = _read_int_table(path, ("sas_id", "original_id"), report)
    mapping: dict[int, tuple[int, int]] = {}
    source: dict[int, int] = {}
    for r, (sas, original) in enumerate(table.tolist()):
        if sas in mapping:
            raise DataError(path, r + 1, f"sas_id {sas} appears again (first on line "
                            f"{mapping[sas][1]}); expected one line per id")
        if original in source:
            raise DataError(path, r + 1, f"original_id {original} is already mapped from "
                            f"sas_id {source[original]}; expected a one-to-one mapping")
        mapping[sas] = (original, r + 1)
        source[original] = sas
    return mapping


def _read_records(path: Path, *, sep: str, fields: int, encoding: str, layout: str,
                  report: LoadReport) -> dict[int, tuple[int, list[str]]]:
    """``id -> (line, fields)`` of a headerless file whose first field is a unique integer id."""
    id_name = layout.split(sep)[0]
    records: dict[int, tuple[int, list[str]]] = {}
    for lineno, parts in _read_separated_lines(path, sep=sep, fields=fields, layout=layout,
                                               encoding=encoding, report=report):
        key = _parse_uint(path, lineno, id_name, parts[0])
        if key in records:
            raise DataError(path, lineno, f"{id_name} {key} appears again (first on line "
                            f"{records[key][0]}); expected unique ids")
        records[key] = (lineno, parts)
    return records


def _merge_removed(report: LoadReport, aux: LoadReport) -> None:
    """Count what was skipped in side files (their reasons name the file) in ``report``."""
    for reason, count in aux.removed.items():
        report.remove(reason, count)


def _region_note(regions: np.ndarray) -> str:
    values, counts = np.unique(regions, return_counts=True)
    parts = ", ".join(f"{v}={c}" for v, c in zip(values.tolist(), counts.tolist()))
    return (f"users per region (first zip-code character; {OTHER_REGION!r} = zip code not "
            f"starting with a digit): {parts}")


def read_movielens_100k(directory: PathLike) -> InteractionLog:
    """Raw MovieLens-100K: ``u.data`` (or ``u.data.gz``), ``u.user``, ``u.item``, ``u.genre``.

    ``u.data``: ``user item rating unix_ts`` (tab-separated integers); each user's sequence is
    sorted by timestamp, stably (many ratings share a second; ties keep file order). Indices
    follow numeric id order (item ``k`` -> index ``k``, user ``u`` -> index ``u - 1`` for the
    official files). ``timestamps`` are the unix seconds.

    ``user_attributes`` from ``u.user`` (``user|age|gender|occupation|zip``): ``"zip"``,
    ``"region"`` (:func:`region_of_zip`; the few Canadian postal codes are
    :data:`OTHER_REGION`; counts in ``report.notes``), ``"gender"``, ``"age"`` (years),
    ``"occupation"``. ``item_features`` from ``u.item`` (latin-1, ``|``-separated, 5 fields
    then one 0/1 flag per genre of ``u.genre``): ``"title"``, ``"genres"`` (``"A|B"``) and ``"year"``
    (:func:`title_year`).

    Raises
    ------
    DataError
        Any file missing or malformed; a user or item of ``u.data`` absent from ``u.user`` /
        ``u.item`` (names ``u.data`` and the line).
    """
    d = _check_directory(directory)
    data_path = _find_file(d, ("u.data", "u.data.gz"))
    report = LoadReport(source=str(data_path))
    table = _read_int_table(data_path, ("user", "item", "rating", "timestamp"), report)
    users, user_codes = _encode_ints(table[:, 0], offset=0)
    items, item_codes = _encode_ints(table[:, 1], offset=1)
    log = _interaction_log(name="ml-100k", report=report, users=users, user_codes=user_codes,
                           items=items, item_codes=item_codes,
                           timestamps=table[:, 3].astype(np.float64))

    aux = LoadReport(source=str(d))
    user_path = _find_file(d, ("u.user",))
    item_path = _find_file(d, ("u.item",))
    genre_path = _find_file(d, ("u.genre",))
    genres = _read_genres(genre_path, aux)
    user_recs = _read_records(user_path, sep="|", fields=5, encoding="latin-1",
                              layout="user|age|gender|occupation|zip", report=aux)
    item_recs = _read_records(item_path, sep="|", fields=5 + len(genres), encoding="latin-1",
                              layout="item|title|release|video release|IMDb URL|"
                                     f"{len(genres)} genre flags", report=aux)

    def lookup(vocab: Vocabulary, column: int, records: dict[int, tuple[int, list[str]]],
               rec_path: Path, what: str) -> list[tuple[int, list[str]]]:
        out = []
        for raw in vocab.ids:
            key = int(raw)
            if key not in records:
                line = _first_row(table[:, column], key) + 1
                raise DataError(data_path, line, f"{what} {key} is not in {rec_path.name}")
            out.append(records[key])
        return out

    user_rows = lookup(users, 0, user_recs, user_path, "user")
    item_rows = lookup(items, 1, item_recs, item_path, "item")
    zips = [f[4].strip() for _, f in user_rows]
    log.user_attributes = {
        "zip": np.array(zips, dtype=np.str_),
        "region": np.array([region_of_zip(z) for z in zips], dtype=np.str_),
        "gender": np.array([f[2].strip() for _, f in user_rows], dtype=np.str_),
        "age": np.array([f[1].strip() for _, f in user_rows], dtype=np.str_),
        "occupation": np.array([f[3].strip() for _, f in user_rows], dtype=np.str_),
    }
    titles, genre_strings = [""], [""]
    for lineno, f in item_rows:
        flags = [v.strip() for v in f[5:]]
        bad = next((k for k, v in enumerate(flags) if v not in ("0", "1")), None)
        if bad is not None:
            raise DataError(item_path, lineno, f"genre flag {genres[bad]!r} must be 0 or 1, "
                            f"got {flags[bad]!r}")
        titles.append(f[1])
        genre_strings.append("|".join(g for g, v in zip(genres, flags) if v == "1"))
    log.item_features = {"title": titles, "genres": genre_strings, "year": [title_year(t) for t in titles]}
    _merge_removed(report, aux)
    report.notes.append(_region_note(log.user_attributes["region"]))
    if len(user_recs) != len(users) or len(item_recs) != len(items):
        report.notes.append(f"{len(user_recs) - len(users)} users of {user_path.name} and "
                            f"{len(item_recs) - len(items)} items of {item_path.name} have no "
                            "interaction")
    logger.info("read %s: %d users, %d items, %d interactions", d, log.num_users,
                log.num_items, log.num_interactions)
    return log


def _read_genres(path: Path, report: LoadReport) -> list[str]:
    """Genre names of ``u.genre`` (``name|index``) in index order; indices must be 0..G-1."""
    rows = _read_separated_lines(path, sep="|", fields=2, layout="name|index",
                                 encoding="latin-1", report=report)
    names: dict[int, str] = {}
    for lineno, (genre, index) in rows:
        k = _parse_uint(path, lineno, "index", index)
        if k in names or k >= len(rows):
            raise DataError(path, lineno, f"genre index {k} is repeated or out of range; "
                            f"expected each of 0..{len(rows) - 1} once")
        names[k] = genre.strip()
    return [names[k] for k in range(len(rows))]


def read_twitch(path: PathLike) -> InteractionLog:
    """The Twitch viewing log (``twitch105k.csv``, Rappaz, McAuley & Aberer, RecSys 2021).

    Header ``,user_id,streamer_name,start_time,community``; the unnamed first column (the row
    index of the original file) is ignored. All four named columns must be non-negative
    integers. Item = ``streamer_name``; each user's sequence is sorted by ``start_time`` (the
    10-minute tick), stably: the many views starting in the same tick keep file order.
    ``timestamps`` = ``start_time``; ``interaction_groups`` = ``community`` (str).
    Repeated views of a streamer are kept (they are most of the log).

    ``user_attributes["community"]``: the community of most of the user's views (counting
    repeats), ties broken by the smallest community label (numerically) — a deterministic
    "home community" for one-client-per-community federations.
    """
    report = LoadReport(source=str(path))
    cols = ("user_id", "streamer_name", "start_time", "community")
    fmt = _table_format(path, None)
    if fmt != "csv":
        raise DataError(path, 0, f"expected a .csv or .csv.gz file, got {fmt}")
    table = _read_delimited(path, sep=",", columns=cols, fmt="csv", report=report)
    user_ids, item_ids, start, community = (_uints(path, table, c) for c in cols)
    users, user_codes = _encode_ints(user_ids, offset=0)
    items, item_codes = _encode_ints(item_ids, offset=1)
    labels, community_codes = np.unique(community, return_inverse=True)
    community_codes = community_codes.reshape(-1)
    log = _interaction_log(name=Path(path).name.split(".")[0], report=report, users=users,
                           user_codes=user_codes, items=items, item_codes=item_codes,
                           timestamps=start.astype(np.float64),
                           groups=community.astype(str))
    counts = np.bincount(user_codes * len(labels) + community_codes,
                         minlength=len(users) * len(labels)).reshape(len(users), len(labels))
    log.user_attributes["community"] = labels[counts.argmax(axis=1)].astype(str)
    report.notes.append(f"{len(labels)} communities; "
                        f"{len(table) - len(np.unique(user_codes * len(items) + item_codes))} "
                        "repeated (user, streamer) views kept")
    logger.info("read %s: %d users, %d items, %d interactions", path, log.num_users,
                log.num_items, log.num_interactions)
    return log


def load_dataset(kind: str, path: PathLike, **options: Any) -> InteractionLog:
    """Read a data set of ``kind`` (one of :data:`DATASET_KINDS`) from ``path``.

    ``"interactions"`` -> :func:`read_interactions` (``options`` are its keyword arguments),
    ``"sasrec"`` -> :func:`read_sasrec_pairs`, ``"ml-1m"`` -> :func:`read_movielens_1m`
    (a folder), ``"ml-100k"`` -> :func:`read_movielens_100k` (a folder),
    ``"twitch"`` -> :func:`read_twitch`.
    """
    readers = {
        "interactions": read_interactions,
        "sasrec": read_sasrec_pairs,
        "ml-1m": read_movielens_1m,
        "ml-100k": read_movielens_100k,
        "twitch": read_twitch,
    }
    if kind not in readers:
        raise ValueError(f"kind must be one of {list(DATASET_KINDS)}, got {kind!r}")
    return readers[kind](path, **options)
