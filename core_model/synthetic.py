"""A seeded SYNTHETIC live-commerce interaction log: the built-in data set for offline machines.

Nothing here is real data. :func:`generate_live_commerce` draws viewers, live streams / products
("items"), merchants and regions from a small generative model whose next-item structure a causal
Transformer (SASRec) can learn and popularity cannot, so that a machine with no data and no
network can still train, evaluate and compare recommenders end to end. The log is labelled
``SYNTHETIC`` in :attr:`InteractionLog.name` and in ``report.notes``.

Generative process (all draws from ``numpy.random.default_rng(config.seed)``, in this order)
----------------------------------------------------------------------------------------------
With ``U`` users, ``N`` items, ``M`` merchants, ``R`` regions, ``C`` categories, ``K`` successors:

1. **Merchants.** Merchant ``m`` lives in region ``region(m)`` (regions dealt round-robin over a
   random permutation of merchants, so every region has a merchant when ``R <= M``) and has a
   main category ``main(m)`` drawn uniformly from ``C``.
2. **Items.** Items are dealt to merchants round-robin over a random permutation of items (every
   merchant owns ``floor(N/M)`` or ``ceil(N/M)`` items). Item ``i`` of merchant ``m`` has category
   ``main(m)`` with probability :data:`MAIN_CATEGORY_PROB`, else a uniform category. Its global
   popularity is Zipfian over a random ranking: ``pop(i) = 1 / rank(i) ** POPULARITY_EXPONENT``.
3. **Successors (the sequential structure).** Every item ``i`` gets ``K`` distinct successors
   ``s_1(i)..s_K(i)`` (fewer when fewer other items exist), drawn without replacement preferring,
   in this order, items of the same merchant *and* category, then the same merchant, then the
   same category, then any other item: a viewer who follows a stream tends to stay in the same
   shop. The successor weights are ``w(i) ~ Dirichlet(SUCCESSOR_CONCENTRATION)``, sorted so that
   ``s_1`` is the most likely successor.
4. **Viewers.** Viewer ``u`` has a region drawn uniformly from ``R``, a taste
   ``theta_u ~ Dirichlet(TASTE_CONCENTRATION * 1_C)`` over categories, and a history length
   ``L_u`` log-uniform in ``[min_length, max_length]``. Her *segment* is ``"light"``,
   ``"regular"`` or ``"heavy"`` by which third of that log range ``L_u`` falls in.
   Her jump distribution over items is

       q_u(i)  proportional to  pop(i) * b_u(i) * (TASTE_FLOOR + C * theta_u[cat(i)]),

   with ``b_u(i) = REGIONAL_BOOST`` when item ``i``'s merchant is in ``u``'s region, else 1.
5. **Sequences.** ``x_1 ~ q_u``. For ``t >= 2``: if ``x_{t-1}`` was not bought, then with
   probability ``transition_prob`` the viewer *follows* the stream (``x_t = s_k(x_{t-1})`` with
   probability ``w_k(x_{t-1})``), otherwise she *jumps* (``x_t ~ q_u``). A buy ends the shopping
   session: the interaction after a buy is always a jump.
6. **Events.** Each interaction gets exactly one event of :data:`EVENT_NAMES`. A merchant is
   *engaged* for a viewer once she has clicked or liked one of its items, until she buys from it.
   With ``p_buy = BUY_PROB_ENGAGED`` for an engaged merchant, else ``BUY_PROB``: the event is
   ``buy`` with probability ``p_buy``, ``click`` with ``CLICK_PROB``, ``like`` with ``LIKE_PROB``,
   else ``view``.
7. **Timestamps** (integer seconds, strictly increasing per viewer). The first interaction is
   uniform in the 30 days after :data:`START_TIME`. A follow adds ``FOLLOW_GAP_MIN +
   Exponential(FOLLOW_GAP_MEAN)`` seconds (same session), a jump adds ``JUMP_GAP_MIN +
   Exponential(JUMP_GAP_MEAN)`` (a new session).

So the next item is strongly, but not fully, predictable from the last one (a follow happens with
probability ``transition_prob``, and then ``s_1`` alone is right with probability ``w_1``); the
last event (a buy) and the viewer's region and taste carry the rest of the signal.

Example (``num_items=6``, ``K=2``, successors ``1 -> (4, 2)``, ``4 -> (2, 6)``)::

    u7 (region-1):  1 --follow--> 4 --follow--> 2 (buy) --jump--> 5 --follow--> ...

Raw ids: users ``user-0000``..., items ``item-0001``... (raw id ``item-k`` is index ``k``),
merchants ``merchant-00``..., regions ``region-0``.... ``interaction_groups`` holds the merchant
of each interaction; ``user_attributes`` has ``"region"`` and ``"segment"``; ``item_features``
has ``"merchant"``, ``"category"`` and ``"title"`` (index 0 is the padding entry ``""``).

Imports numpy (and the standard library) only.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np

from core_model.data import InteractionLog, LoadReport, Vocabulary

logger = logging.getLogger(__name__)

EVENT_NAMES: tuple[str, ...] = ("view", "click", "like", "buy")
"""Event types; ``InteractionLog.events`` holds indices into this tuple."""

CSV_HEADER: tuple[str, ...] = ("user", "item", "timestamp", "event", "group", "region")
"""Columns written by :func:`write_csv`."""

CATEGORY_NAMES: tuple[str, ...] = (
    "beauty", "fashion", "electronics", "home", "food", "toys", "sports", "jewelry",
    "pets", "books", "health", "baby", "garden", "auto", "games", "music",
)
"""Names of the first categories; further ones are called ``category-<c>``."""

MAIN_CATEGORY_PROB = 0.7
"""Probability that an item has its merchant's main category."""
POPULARITY_EXPONENT = 0.8
"""Zipf exponent of global item popularity."""
SUCCESSOR_CONCENTRATION = 1.0
"""Dirichlet concentration of each item's successor weights (1.0: uniform on the simplex)."""
TASTE_CONCENTRATION = 0.3
"""Dirichlet concentration of a viewer's category taste (small: a few favourite categories)."""
TASTE_FLOOR = 0.2
"""Added to ``C * theta_u[c]`` so that no category has zero jump probability."""
REGIONAL_BOOST = 4.0
"""Jump weight multiplier for items whose merchant is in the viewer's region."""
CLICK_PROB = 0.2
LIKE_PROB = 0.1
BUY_PROB = 0.01
"""Buy probability when the item's merchant is not engaged (no earlier click or like)."""
BUY_PROB_ENGAGED = 0.15
"""Buy probability when the viewer clicked or liked this merchant since her last buy from it."""
START_TIME = 1_700_000_000
"""Unix time (2023-11-14) of the start of the 30-day window of first interactions."""
FOLLOW_GAP_MIN, FOLLOW_GAP_MEAN = 5.0, 90.0
"""Seconds between interactions in one session: minimum plus an exponential with this mean."""
JUMP_GAP_MIN, JUMP_GAP_MEAN = 600.0, 86_400.0
"""Seconds before a jump (new session): minimum plus an exponential with this mean."""

_START_WINDOW = 30 * 86_400.0


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and structure of the synthetic live-commerce log (see the module docstring).

    Parameters
    ----------
    num_users
        Viewers ``U`` (>= 1).
    num_items
        Live streams / products ``N`` (>= 1).
    num_merchants
        Merchants ``M`` (1..num_items); each owns at least one item.
    num_regions
        Regions ``R`` (>= 1) of viewers and merchants.
    num_categories
        Product categories ``C`` (>= 1).
    min_length, max_length
        Bounds of a viewer's history length (1 <= min_length <= max_length).
    successors_per_item
        ``K`` (>= 1): how many likely successors each item has.
    transition_prob
        Probability in [0, 1] that a viewer follows a successor of her last item rather than
        jumping. 0 removes all sequential structure (a negative control).
    seed
        Seed (>= 0) of ``numpy.random.default_rng``; the log is a function of the config.
    """

    num_users: int = 3000
    num_items: int = 800
    num_merchants: int = 20
    num_regions: int = 5
    num_categories: int = 12
    min_length: int = 12
    max_length: int = 80
    successors_per_item: int = 3
    transition_prob: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_users", self.num_users, 1)
        _check_int("num_items", self.num_items, 1)
        _check_int("num_merchants", self.num_merchants, 1)
        if self.num_merchants > self.num_items:
            raise ValueError(f"num_merchants must be <= num_items ({self.num_items}), "
                             f"got {self.num_merchants}")
        _check_int("num_regions", self.num_regions, 1)
        _check_int("num_categories", self.num_categories, 1)
        _check_int("min_length", self.min_length, 1)
        _check_int("max_length", self.max_length, 1)
        if self.max_length < self.min_length:
            raise ValueError(f"max_length must be >= min_length ({self.min_length}), "
                             f"got {self.max_length}")
        _check_int("successors_per_item", self.successors_per_item, 1)
        p = self.transition_prob
        if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"transition_prob must be in [0, 1], got {p!r}")
        _check_int("seed", self.seed, 0)


def _category_name(c: int) -> str:
    return CATEGORY_NAMES[c] if c < len(CATEGORY_NAMES) else f"category-{c}"


def _successors(rng: np.random.Generator, merchant: np.ndarray, category: np.ndarray,
                k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Step 3: successor items (0-based) and cumulative weights, most likely first, per item."""
    n = len(merchant)
    by_merchant = {m: np.flatnonzero(merchant == m) for m in np.unique(merchant)}
    by_category = {c: np.flatnonzero(category == c) for c in np.unique(category)}
    succ: list[list[int]] = []
    cum: list[list[float]] = []
    for i in range(n):
        same_m = by_merchant[merchant[i]]
        same_c = by_category[category[i]]
        tiers = (same_m[category[same_m] == category[i]], same_m, same_c, np.arange(n))
        chosen: list[int] = []
        for tier in tiers:
            need = k - len(chosen)
            if need <= 0:
                break
            pool = tier[(tier != i) & ~np.isin(tier, chosen)]
            if len(pool):
                chosen.extend(rng.choice(pool, size=min(need, len(pool)), replace=False).tolist())
        if not chosen:  # a catalogue of one item: it follows itself
            chosen = [i]
        w = np.sort(rng.dirichlet(np.full(len(chosen), SUCCESSOR_CONCENTRATION)))[::-1]
        succ.append(chosen)
        c = np.cumsum(w)
        c[-1] = 1.0
        cum.append(c.tolist())
    return succ, cum


def generate_live_commerce(config: SyntheticConfig | None = None) -> InteractionLog:
    """Generate the SYNTHETIC live-commerce log described in the module docstring.

    Parameters
    ----------
    config
        Sizes, structure and seed; ``None`` means ``SyntheticConfig()``.

    Returns
    -------
    InteractionLog
        With timestamps, events (``event_names == EVENT_NAMES``), merchant ``interaction_groups``,
        user attributes ``"region"`` and ``"segment"`` and item features ``"merchant"``,
        ``"category"`` and ``"title"``. Deterministic given ``config``.
    """
    cfg = SyntheticConfig() if config is None else config
    rng = np.random.default_rng(cfg.seed)
    U, N, M, R, C = cfg.num_users, cfg.num_items, cfg.num_merchants, cfg.num_regions, \
        cfg.num_categories

    # 1. merchants
    merchant_region = np.empty(M, dtype=np.int64)
    merchant_region[rng.permutation(M)] = np.arange(M) % R
    merchant_main = rng.integers(0, C, size=M)

    # 2. items (0-based here; index = position + 1)
    item_merchant = np.empty(N, dtype=np.int64)
    item_merchant[rng.permutation(N)] = np.arange(N) % M
    own_main = rng.random(N) < MAIN_CATEGORY_PROB
    item_category = np.where(own_main, merchant_main[item_merchant], rng.integers(0, C, size=N))
    rank = np.empty(N, dtype=np.int64)
    rank[rng.permutation(N)] = np.arange(1, N + 1)
    popularity = 1.0 / rank.astype(np.float64) ** POPULARITY_EXPONENT

    # 3. successors
    succ, succ_cum = _successors(rng, item_merchant, item_category, cfg.successors_per_item)

    # 4. viewers
    user_region = rng.integers(0, R, size=U)
    taste = rng.dirichlet(np.full(C, TASTE_CONCENTRATION), size=U)  # (U, C)
    log_lo, log_hi = math.log(cfg.min_length), math.log(cfg.max_length + 1)
    log_len = rng.uniform(log_lo, log_hi, size=U)
    lengths = np.clip(np.floor(np.exp(log_len)).astype(np.int64), cfg.min_length, cfg.max_length)
    third = np.clip(((log_len - log_lo) / max(log_hi - log_lo, 1e-12) * 3).astype(np.int64), 0, 2)
    segment_names = np.array(["light", "regular", "heavy"])
    boost = np.where(merchant_region[item_merchant][None, :] == np.arange(R)[:, None],
                     REGIONAL_BOOST, 1.0)  # (R, N)
    jump_w = popularity[None, :] * boost[user_region] \
        * (TASTE_FLOOR + C * taste[:, item_category])  # (U, N)
    jump_cdf = np.cumsum(jump_w, axis=1)
    jump_cdf /= jump_cdf[:, -1:]  # (U, N)

    # 5.-7. sequences, events, timestamps
    total = int(lengths.sum())
    u_follow = rng.random(total).tolist()
    u_succ = rng.random(total).tolist()
    u_event = rng.random(total).tolist()
    u_jump = rng.random(total)
    follow_gap = (FOLLOW_GAP_MIN + rng.exponential(FOLLOW_GAP_MEAN, size=total)).tolist()
    jump_gap = (JUMP_GAP_MIN + rng.exponential(JUMP_GAP_MEAN, size=total)).tolist()
    start = rng.uniform(0.0, _START_WINDOW, size=U)
    item_merchant_l = item_merchant.tolist()
    p_follow = float(cfg.transition_prob)
    view, click, like, buy = range(4)

    sequences: list[np.ndarray] = []
    timestamps: list[np.ndarray] = []
    events: list[np.ndarray] = []
    offset = 0
    for u in range(U):
        n_u = int(lengths[u])
        jumps = np.searchsorted(jump_cdf[u], u_jump[offset:offset + n_u], side="right")
        jumps = np.minimum(jumps, N - 1).tolist()
        seq = [0] * n_u
        ev = [0] * n_u
        ts = [0.0] * n_u
        engaged: set[int] = set()
        t = START_TIME + float(start[u])
        prev, prev_bought = -1, False
        for s in range(n_u):
            r = offset + s
            if s > 0 and not prev_bought and u_follow[r] < p_follow:
                cum = succ_cum[prev]
                x = u_succ[r]
                k = 0
                while k < len(cum) - 1 and x >= cum[k]:
                    k += 1
                item = succ[prev][k]
                t += follow_gap[r]
            else:
                item = jumps[s]
                if s > 0:
                    t += jump_gap[r]
            m = item_merchant_l[item]
            p_buy = BUY_PROB_ENGAGED if m in engaged else BUY_PROB
            e = u_event[r]
            if e < p_buy:
                event = buy
                engaged.discard(m)
            elif e < p_buy + CLICK_PROB:
                event = click
                engaged.add(m)
            elif e < p_buy + CLICK_PROB + LIKE_PROB:
                event = like
                engaged.add(m)
            else:
                event = view
            seq[s], ev[s], ts[s] = item + 1, event, float(round(t))
            prev, prev_bought = item, event == buy
        offset += n_u
        sequences.append(np.asarray(seq, dtype=np.int64))
        events.append(np.asarray(ev, dtype=np.int64))
        timestamps.append(np.asarray(ts, dtype=np.float64))

    merchant_ids = [f"merchant-{m:0{max(2, len(str(M - 1)))}d}" for m in range(M)]
    width_i, width_u = max(4, len(str(N))), max(4, len(str(U - 1)))
    item_ids = tuple(f"item-{i:0{width_i}d}" for i in range(1, N + 1))
    user_ids = tuple(f"user-{u:0{width_u}d}" for u in range(U))
    merchant_arr = np.array(merchant_ids, dtype=str)
    groups = [merchant_arr[item_merchant[seq - 1]] for seq in sequences]
    item_merchant_names = [merchant_ids[m] for m in item_merchant_l]
    item_category_names = [_category_name(int(c)) for c in item_category]
    titles = [f"{cat} live #{i + 1} ({mer})"
              for i, (cat, mer) in enumerate(zip(item_category_names, item_merchant_names))]

    name = f"synthetic live-commerce (seed {cfg.seed})"
    report = LoadReport(source="synthetic:generate_live_commerce", rows_read=total)
    report.notes.append(
        "SYNTHETIC data generated by core_model.synthetic.generate_live_commerce, not real "
        f"interactions; config {asdict(cfg)}")
    logger.info("generated %s: %d users, %d items, %d interactions",
                name, U, N, total)
    return InteractionLog(
        name=name,
        sequences=sequences,
        items=Vocabulary(item_ids, offset=1),
        users=Vocabulary(user_ids, offset=0),
        report=report,
        timestamps=timestamps,
        events=events,
        event_names=EVENT_NAMES,
        interaction_groups=groups,
        user_attributes={
            "region": np.array([f"region-{r}" for r in user_region.tolist()], dtype=str),
            "segment": segment_names[third],
        },
        item_features={
            "merchant": [""] + item_merchant_names,
            "category": [""] + item_category_names,
            "title": [""] + titles,
        },
    )


def write_csv(log: InteractionLog, path: str | os.PathLike[str]) -> int:
    """Write ``log`` as a generic CSV with header ``user,item,timestamp,event,group,region``.

    One row per interaction, users in index order, each user's rows oldest first; raw ids are
    written (``user-0003``, ``item-0042``). ``timestamp`` is the interaction's timestamp
    (integers are written without a decimal point) or its position when the log has none;
    ``event``, ``group`` and ``region`` are empty when the log lacks them.

    Returns
    -------
    int
        Number of data rows written.
    """
    regions = log.user_attributes.get("region")
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for u, seq in enumerate(log.sequences):
            user = log.users.raw(u)
            region = "" if regions is None else str(regions[u])
            ts = log.timestamps[u] if log.timestamps is not None else np.arange(len(seq))
            for s, item in enumerate(seq.tolist()):
                t = float(ts[s])
                event = "" if log.events is None or log.event_names is None \
                    else log.event_names[int(log.events[u][s])]
                group = "" if log.interaction_groups is None else str(log.interaction_groups[u][s])
                writer.writerow((user, log.items.raw(item),
                                 int(t) if t.is_integer() else repr(t), event, group, region))
                rows += 1
    return rows
