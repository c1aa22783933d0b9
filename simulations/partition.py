"""Partitioners: which users of a leave-one-out split each simulated client holds.

A partition assigns every row of a :class:`~core_model.data.LeaveOneOutSplit` (one row = one
user) to exactly one client. The unit of privacy is the user, so a user's whole history lives
at one client; no scheme ever splits a user's interactions across clients.

Schemes (:func:`partition_users`, ``scheme=``):

* ``"attribute"`` -- one client per distinct value of a user attribute (``"region"`` for
  MovieLens, ``"community"`` for Twitch), clients in natural order of the values
  (``"2" < "10"``, ``"region-2" < "region-10"``). The natural federation of the data.
* ``"group"`` -- one client per interaction group (merchant, community) for logs whose groups
  are per interaction: a user goes to the group of most of their interactions (ties: the
  smallest label in natural order). How many interactions lie at other groups is in the notes.
* ``"iid"`` -- users shuffled and dealt into ``num_clients`` parts whose sizes differ by at
  most one (the homogeneous baseline).
* ``"dirichlet-size"`` -- quantity skew: client sizes proportional to
  ``p ~ Dirichlet(alpha * 1_K)`` on top of ``min_users`` each; users shuffled (Li et al.,
  "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022, Sec. IV-B).
* ``"dirichlet-label"`` -- label skew (Hsu, Qi & Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification", 2019, Sec. 3.1): the
  label is a user attribute (``"region"`` by default); for each label value ``c`` its users
  are spread over the ``K`` clients with proportions ``q_c ~ Dirichlet(alpha * 1_K)``. Small
  ``alpha`` gives each client few labels; ``alpha -> inf`` tends to IID. Deviation from the
  paper: afterwards every client with fewer than ``min_users`` users receives users, one at a
  time, drawn at random from the currently largest client (ties: the lowest client index), so
  no client is empty; the number moved is in the notes.

Random schemes draw from ``numpy.random.default_rng(seed)`` only, so a partition is a function
of (split, scheme, parameters, seed). Proportions are turned into counts by largest-remainder
rounding (ties: the lowest client index), which keeps the totals exact.

Imports numpy and the standard library only.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from core_model.data import InteractionLog, LeaveOneOutSplit

logger = logging.getLogger(__name__)

SCHEMES: tuple[str, ...] = ("attribute", "group", "iid", "dirichlet-size", "dirichlet-label")
"""Values of ``scheme`` accepted by :func:`partition_users`."""

DEFAULT_LABEL_ATTRIBUTE = "region"
"""User attribute used as the label of ``"dirichlet-label"`` when ``attribute`` is not given."""

_DIGITS = re.compile(r"(\d+)")


def natural_key(value: str) -> tuple[Any, ...]:
    """Sort key that orders digit runs numerically: ``"2" < "10"``, ``"c-2" < "c-10"``.

    ``re.split`` with a capturing group alternates text and digit runs, so positions of equal
    parity always hold the same type and keys of any two strings compare without error.
    """
    parts = _DIGITS.split(value)
    return tuple(int(p) if k % 2 else p for k, p in enumerate(parts))


@dataclass(frozen=True)
class Partition:
    """Rows of a leave-one-out split held by each client.

    Attributes
    ----------
    names
        One unique name per client (``"0"``..``"9"`` for regions, ``"merchant-03"``,
        ``"iid-0007"``).
    rows
        ``rows[k]``: sorted, read-only int64 row indices (positions in the split, see
        :meth:`LeaveOneOutSplit.subset`) of client ``k``.
    scheme
        The scheme that built it (one of :data:`SCHEMES`, or anything for hand-made ones).
    notes
        Human-readable facts a report should show (label used, users moved, ...).
    """

    names: tuple[str, ...]
    rows: tuple[np.ndarray, ...]
    scheme: str
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        if len(names) != len(self.rows):
            raise ValueError(f"names and rows must have one entry per client, got "
                             f"{len(names)} names and {len(self.rows)} row arrays")
        if len(set(names)) != len(names):
            dup = next(n for k, n in enumerate(names) if n in names[:k])
            raise ValueError(f"client names must be unique, {dup!r} appears more than once")
        rows = []
        for name, r in zip(names, self.rows):
            arr = np.asarray(r)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"rows of client {name!r} must be a 1-D integer array, got "
                                 f"shape {arr.shape} dtype {arr.dtype}")
            arr = np.sort(arr.astype(np.int64))
            arr.flags.writeable = False
            rows.append(arr)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "rows", tuple(rows))
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))

    @property
    def num_clients(self) -> int:
        return len(self.names)

    def sizes(self) -> np.ndarray:
        """Users per client (int64, client order)."""
        return np.array([len(r) for r in self.rows], dtype=np.int64)

    def report(self) -> dict[str, Any]:
        """Scheme, number of clients and users, min / median / max users, sizes, notes."""
        sizes = self.sizes()
        has = sizes.size > 0
        return {
            "scheme": self.scheme,
            "clients": self.num_clients,
            "users": int(sizes.sum()),
            "min_users": int(sizes.min()) if has else 0,
            "median_users": float(np.median(sizes)) if has else 0.0,
            "max_users": int(sizes.max()) if has else 0,
            "sizes": {name: int(s) for name, s in zip(self.names, sizes.tolist())},
            "notes": list(self.notes),
        }

    def client_of_rows(self, num_rows: int | None = None) -> np.ndarray:
        """``out[row]`` = index of the client holding ``row``; ``-1`` for rows no client holds.

        ``num_rows`` defaults to the number of rows held (right for a complete partition).
        Raises ``ValueError`` if a row is out of range or held by two clients.
        """
        n = int(self.sizes().sum()) if num_rows is None else int(num_rows)
        self._check_rows(n)
        out = np.full(n, -1, dtype=np.int64)
        for k, r in enumerate(self.rows):
            out[r] = k
        return out

    def validate(self, num_rows: int) -> None:
        """Raise ``ValueError`` unless the clients' rows are disjoint and cover 0..num_rows-1."""
        if isinstance(num_rows, bool) or not isinstance(num_rows, Integral) or num_rows < 0:
            raise ValueError(f"num_rows must be an integer >= 0, got {num_rows!r}")
        self._check_rows(int(num_rows))
        held = int(self.sizes().sum())
        if held != num_rows:
            covered = np.zeros(int(num_rows), dtype=bool)
            for r in self.rows:
                covered[r] = True
            missing = np.flatnonzero(~covered)
            raise ValueError(f"partition {self.scheme!r} is incomplete: {len(missing)} of "
                             f"{num_rows} rows belong to no client (first: "
                             f"{missing[:5].tolist()})")

    def _check_rows(self, num_rows: int) -> None:
        """Rows in range and held by at most one client (``ValueError`` naming the clients)."""
        owner = np.full(num_rows, -1, dtype=np.int64)
        for k, r in enumerate(self.rows):
            if r.size and (r[0] < 0 or r[-1] >= num_rows):
                bad = int(r[0] if r[0] < 0 else r[-1])
                raise ValueError(f"client {self.names[k]!r} holds row {bad}, outside "
                                 f"0..{num_rows - 1}")
            if r.size > 1 and np.any(r[1:] == r[:-1]):
                dup = int(r[1:][r[1:] == r[:-1]][0])
                raise ValueError(f"client {self.names[k]!r} holds row {dup} more than once")
            taken = owner[r] >= 0
            if np.any(taken):
                row = int(r[taken][0])
                raise ValueError(f"row {row} is held by clients {self.names[owner[row]]!r} and "
                                 f"{self.names[k]!r}; a user must be at exactly one client")
            owner[r] = k


def partition_users(log: InteractionLog, split: LeaveOneOutSplit, *, scheme: str,
                    num_clients: int | None = None, attribute: str | None = None,
                    alpha: float = 0.5, seed: int = 0, min_users: int = 1) -> Partition:
    """Assign every user (row) of ``split`` to one client (see the module docstring).

    Parameters
    ----------
    log
        The log ``split`` was made from (``split.user_index`` indexes its users); source of
        ``user_attributes`` and ``interaction_groups``.
    split
        The leave-one-out split whose rows are partitioned.
    scheme
        One of :data:`SCHEMES`.
    num_clients
        Number of clients ``K`` (>= 1, <= users) for ``"iid"`` and the Dirichlet schemes.
        For ``"attribute"`` and ``"group"`` the data decide ``K``; a given value must match.
    attribute
        User attribute: required for ``"attribute"``; the label of ``"dirichlet-label"``
        (default :data:`DEFAULT_LABEL_ATTRIBUTE`). Not used by the other schemes.
    alpha
        Dirichlet concentration (> 0) of the Dirichlet schemes: small = skewed.
    seed
        Seed of ``numpy.random.default_rng`` for the random schemes.
    min_users
        Fewest users a client may hold (>= 1). The Dirichlet schemes guarantee it; for
        ``"attribute"`` and ``"group"`` a smaller client is an error naming it.

    Returns
    -------
    Partition
        Complete and disjoint over ``range(len(split))``; client rows sorted.

    Raises
    ------
    ValueError
        Unknown scheme or attribute, a log without interaction groups for ``"group"``, or a
        parameter out of range; the message names the parameter, the value and what was
        expected.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if isinstance(min_users, bool) or not isinstance(min_users, Integral) or min_users < 1:
        raise ValueError(f"min_users must be an integer >= 1 (an empty client cannot train), "
                         f"got {min_users!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    n = len(split)
    if n == 0:
        raise ValueError("split has no users; expected at least one row to partition")
    users = np.asarray(split.user_index, dtype=np.int64)
    if users.min() < 0 or users.max() >= log.num_users:
        raise ValueError(f"split.user_index must index the {log.num_users} users of "
                         f"{log.name!r}, got values in {int(users.min())}..{int(users.max())}; "
                         "was the split made from another log?")
    dirichlet = scheme.startswith("dirichlet")
    if scheme in ("iid", "dirichlet-size", "dirichlet-label"):
        _check_num_clients(num_clients, scheme, n)
        if min_users * int(num_clients) > n:  # type: ignore[arg-type]
            raise ValueError(f"min_users * num_clients must be <= the {n} users of the split, "
                             f"got {min_users} * {num_clients} = {min_users * num_clients}")
    if dirichlet and (isinstance(alpha, bool) or not isinstance(alpha, Real)
                      or not alpha > 0 or not math.isfinite(float(alpha))):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")

    if scheme == "attribute":
        part = _by_attribute(log, users, attribute, num_clients, min_users)
    elif scheme == "group":
        part = _by_group(log, users, num_clients, min_users)
    elif scheme == "iid":
        part = _iid(n, int(num_clients), seed)  # type: ignore[arg-type]
    elif scheme == "dirichlet-size":
        part = _dirichlet_size(n, int(num_clients), float(alpha), seed,  # type: ignore[arg-type]
                               int(min_users))
    else:
        label_attr = DEFAULT_LABEL_ATTRIBUTE if attribute is None else attribute
        labels = _user_attribute(log, label_attr, scheme)[users]
        part = _dirichlet_label(labels, label_attr, int(num_clients),  # type: ignore[arg-type]
                                float(alpha), seed, int(min_users))
    part.validate(n)
    sizes = part.sizes()
    logger.info("partition %s of %s: %s clients, users per client min %s / median %s / max %s",
                scheme, log.name, part.num_clients, int(sizes.min()),
                float(np.median(sizes)), int(sizes.max()))
    return part


# -- checks ------------------------------------------------------------------------------------


def _check_num_clients(num_clients: object, scheme: str, n: int) -> None:
    if num_clients is None or isinstance(num_clients, bool) \
            or not isinstance(num_clients, Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1 for scheme {scheme!r}, "
                         f"got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients must be <= the {n} users of the split (each client "
                         f"needs a user), got {num_clients}")


def _user_attribute(log: InteractionLog, attribute: str | None, scheme: str) -> np.ndarray:
    available = sorted(log.user_attributes)
    if attribute is None:
        raise ValueError(f"attribute is required for scheme {scheme!r}, got None; available "
                         f"user attributes of {log.name!r}: {available}")
    if attribute not in log.user_attributes:
        raise ValueError(f"attribute {attribute!r} is not a user attribute of {log.name!r}; "
                         f"available: {available}")
    values = np.asarray(log.user_attributes[attribute]).astype(str)
    if len(values) != log.num_users:
        raise ValueError(f"user attribute {attribute!r} of {log.name!r} has {len(values)} "
                         f"values; expected one per user ({log.num_users})")
    return values


def _clients_from_labels(labels: np.ndarray, *, what: str, num_clients: int | None,
                         min_users: int, scheme: str) -> tuple[tuple[str, ...],
                                                               tuple[np.ndarray, ...]]:
    """One client per distinct label (natural order); rows = positions with that label."""
    values, codes = np.unique(labels, return_inverse=True)
    order = sorted(range(len(values)), key=lambda k: natural_key(str(values[k])))
    names = tuple(str(values[k]) for k in order)
    by_code = np.argsort(codes.reshape(-1), kind="stable")
    bounds = np.cumsum(np.bincount(codes.reshape(-1), minlength=len(values)))
    starts = np.concatenate([[0], bounds[:-1]])
    rows = tuple(by_code[starts[k]:bounds[k]] for k in order)
    if num_clients is not None and num_clients != len(names):
        raise ValueError(f"num_clients must equal the number of distinct {what} values "
                         f"({len(names)}) for scheme {scheme!r}, or be None; got {num_clients!r}")
    small = [f"{name}={len(r)}" for name, r in zip(names, rows) if len(r) < min_users]
    if small:
        raise ValueError(f"min_users is {min_users} but {len(small)} {what} clients hold "
                         f"fewer users: {', '.join(small[:10])}"
                         f"{' ...' if len(small) > 10 else ''}; lower min_users or choose "
                         "another scheme")
    return names, rows


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (which sum to ~1).

    Floors first, then one extra unit to the largest fractional parts (ties: lowest index).
    """
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        frac = raw - counts
        counts[np.argsort(-frac, kind="stable")[:short]] += 1
    return counts


def _numbered(prefix: str, k: int) -> tuple[str, ...]:
    width = max(4, len(str(k - 1)))
    return tuple(f"{prefix}-{i:0{width}d}" for i in range(k))


# -- schemes -----------------------------------------------------------------------------------


def _by_attribute(log: InteractionLog, users: np.ndarray, attribute: str | None,
                  num_clients: int | None, min_users: int) -> Partition:
    labels = _user_attribute(log, attribute, "attribute")[users]
    names, rows = _clients_from_labels(labels, what=f"{attribute!r}", num_clients=num_clients,
                                       min_users=min_users, scheme="attribute")
    note = f"one client per value of user attribute {attribute!r} ({len(names)} values)"
    return Partition(names=names, rows=rows, scheme="attribute", notes=(note,))


def _by_group(log: InteractionLog, users: np.ndarray, num_clients: int | None,
              min_users: int) -> Partition:
    if log.interaction_groups is None:
        raise ValueError(f"scheme 'group' needs per-interaction groups, but "
                         f"{log.name!r} has interaction_groups=None; use scheme 'attribute' "
                         f"with one of its user attributes {sorted(log.user_attributes)}")
    groups = [np.asarray(log.interaction_groups[u]).astype(str) for u in users.tolist()]
    lengths = np.array([len(g) for g in groups], dtype=np.int64)
    if np.any(lengths == 0):
        row = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"user {int(users[row])} of {log.name!r} has no interaction groups; "
                         "expected one group label per interaction")
    flat = np.concatenate(groups)
    values, codes = np.unique(flat, return_inverse=True)
    # Re-code labels so that code order == natural order (the tie rule: smallest label).
    rank = np.empty(len(values), dtype=np.int64)
    rank[sorted(range(len(values)), key=lambda k: natural_key(str(values[k])))] = \
        np.arange(len(values))
    codes = rank[codes.reshape(-1)]
    ordered = np.empty(len(values), dtype=object)
    ordered[rank] = values
    owner = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    pair, counts = np.unique(owner * len(values) + codes, return_counts=True)
    pair_row, pair_code = pair // len(values), pair % len(values)
    # Per row: the most interactions first, then the smallest label; keep the first.
    order = np.lexsort((pair_code, -counts, pair_row))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_row[order][1:] != pair_row[order][:-1]
    main_code = pair_code[order][first]                   # (rows,) in row order
    main_count = counts[order][first]
    labels = np.array([str(ordered[c]) for c in main_code.tolist()], dtype=str)
    names, rows = _clients_from_labels(labels, what="group", num_clients=num_clients,
                                       min_users=min_users, scheme="group")
    total = int(lengths.sum())
    elsewhere = total - int(main_count.sum())
    mixed = int(np.count_nonzero(main_count < lengths))
    notes = [
        f"one client per interaction group; each user at the group of most of their "
        f"interactions (ties: smallest label); {len(names)} of {len(values)} groups are "
        "some user's main group",
        f"{elsewhere} of {total} interactions ({100.0 * elsewhere / total:.1f}%), of {mixed} "
        "users, lie at other groups than their user's main one; they stay with that user's "
        "client (a user's whole history is at one client, the unit of privacy)",
    ]
    unused = sorted(set(map(str, values)) - set(names), key=natural_key)
    if unused:
        notes.append(f"{len(unused)} groups have no client (no user has most interactions "
                     f"there): {', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}")
    return Partition(names=names, rows=rows, scheme="group", notes=tuple(notes))


def _iid(n: int, k: int, seed: int) -> Partition:
    perm = np.random.default_rng(seed).permutation(n)
    rows = tuple(np.array_split(perm, k))
    note = f"users shuffled with seed {seed} and dealt into {k} parts of near-equal size"
    return Partition(names=_numbered("iid", k), rows=rows, scheme="iid", notes=(note,))


def _dirichlet_size(n: int, k: int, alpha: float, seed: int, min_users: int) -> Partition:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # defensive: numpy >= 1.24 avoids this
        raise ValueError(f"alpha={alpha} is too small for a stable Dirichlet draw; "
                         "expected alpha >= about 1e-3")
    sizes = min_users + _largest_remainder(p, n - min_users * k)
    perm = rng.permutation(n)
    rows = tuple(np.split(perm, np.cumsum(sizes)[:-1]))
    note = (f"client sizes = {min_users} + largest-remainder share of the other "
            f"{n - min_users * k} users by p ~ Dirichlet({alpha:g}), seed {seed}")
    return Partition(names=_numbered("dirichlet", k), rows=rows, scheme="dirichlet-size",
                     notes=(note,))


def _dirichlet_label(labels: np.ndarray, attribute: str, k: int, alpha: float, seed: int,
                     min_users: int) -> Partition:
    rng = np.random.default_rng(seed)
    values = sorted(set(labels.tolist()), key=natural_key)
    client = np.empty(len(labels), dtype=np.int64)
    for value in values:
        members = rng.permutation(np.flatnonzero(labels == value))
        q = rng.dirichlet(np.full(k, alpha))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # defensive, as in _dirichlet_size
            raise ValueError(f"alpha={alpha} is too small for a stable Dirichlet draw; "
                             "expected alpha >= about 1e-3")
        client[members] = np.repeat(np.arange(k), _largest_remainder(q, len(members)))
    sizes = np.bincount(client, minlength=k)
    moved = 0
    for target in range(k):
        while sizes[target] < min_users:
            donor = int(np.argmax(sizes))  # first maximum: the lowest index among ties
            candidates = np.flatnonzero(client == donor)
            row = int(candidates[rng.integers(len(candidates))])
            client[row] = target
            sizes[donor] -= 1
            sizes[target] += 1
            moved += 1
    rows = tuple(np.flatnonzero(client == c) for c in range(k))
    notes = [
        f"label skew over user attribute {attribute!r} ({len(values)} values): each value's "
        f"users spread over {k} clients by q ~ Dirichlet({alpha:g}), seed {seed}",
        f"{moved} users moved from the largest clients to clients with fewer than "
        f"{min_users} users",
    ]
    return Partition(names=_numbered("dirichlet", k), rows=rows, scheme="dirichlet-label",
                     notes=tuple(notes))


def label_distribution(partition: Partition, labels: Sequence[str] | np.ndarray
                       ) -> tuple[tuple[str, ...], np.ndarray]:
    """Per-client label shares: ``(values, shares)`` with ``shares[k, j]`` = fraction of
    client ``k``'s users whose label (``labels[row]``) is ``values[j]``; values in natural order.
    """
    labels = np.asarray(labels).astype(str)
    values = tuple(sorted(set(labels.tolist()), key=natural_key))
    index = {v: j for j, v in enumerate(values)}
    codes = np.array([index[v] for v in labels.tolist()], dtype=np.int64)
    shares = np.zeros((partition.num_clients, len(values)))
    for k, r in enumerate(partition.rows):
        if len(r):
            shares[k] = np.bincount(codes[r], minlength=len(values)) / len(r)
    return values, shares
