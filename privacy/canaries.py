"""Empirical privacy audit in one training run: canary users and a lower bound on epsilon.

The claimed epsilon is an *upper* bound proved from the mechanism. This module measures a
*lower* bound from the trained model alone, following Steinke, Nasr & Jagielski, "Privacy
Auditing with One (1) Training Run" (NeurIPS 2023), in its black-box (input-space) form:

1. Before training, ``m`` **canary users** are drawn: each a history of ``length`` distinct items
   drawn uniformly from the public catalogue, assigned to a client, and *included* in that
   client's training data with probability 1/2, independently (:func:`make_canaries`; OS
   randomness, so that nobody, the trainer included, can predict the inclusion bits). A canary is
   one user, the unit of privacy: the audit tests exactly the guarantee the ledgers claim.
2. After training, every canary gets a **membership score** from the final model only: the mean
   log-likelihood the model gives to the canary's own next-item sequence, i.e. minus the
   training loss on that user (:func:`canary_scores`). A member was trained on; its score tends to
   be higher.
3. The auditor **guesses**: "in" for the ``k`` highest scores, "out" for the ``k`` lowest, and
   abstains on the rest; ``v`` of the ``r = 2k`` guesses are correct.
4. If the training run is (epsilon, delta)-DP with respect to each canary, then (their Theorem
   5.2) ``P[v correct guesses or more] <= beta + alpha * 2m * delta``, where with
   ``q = e^eps / (1 + e^eps)``, ``beta = P[Binomial(r, q) >= v]`` and
   ``alpha = max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i`` (:func:`p_value`). The **lower
   bound** is the largest epsilon that this rejects at confidence ``1 - significance``
   (:func:`epsilon_lower_bound`): "the run is not (eps_lb, delta)-DP", a statement that holds
   with probability >= 1 - significance over the canaries' inclusion bits.

The guess size ``k`` is not tuned on the outcome: every ``k`` of a fixed grid
(:data:`GUESS_FRACTIONS` of ``m``) is tried at significance ``significance / len(grid)``
(Bonferroni), so that the best of them is still a valid bound (:func:`audit_scores`).

What a lower bound means: it is a *test*, not an estimate. A DP run must give a lower bound below
its claimed epsilon (else the implementation or the accounting is wrong, up to the stated
confidence); a run without DP may give a large one (the model memorises its users). A small lower
bound does not prove privacy: black-box canaries with one run are weak attacks, typically far below
the claimed epsilon even when the claim is tight. No Flower imports.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.accounting import default_delta as accounting_default_delta

CANARY_FILE = "canaries.json"
"""Name of the canary file in a run directory (written before training, read by the clients and
the audit)."""
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""Guess sizes ``k`` tried, as fractions of the number of canaries (``k`` in, ``k`` out)."""
SIGNIFICANCE = 0.05
"""Default ``1 - confidence`` of the lower bound (95 %), shared by the grid by Bonferroni."""


@dataclass(frozen=True)
class Canaries:
    """The canary users of a run.

    ``histories[j]`` is canary ``j``'s history (item ids in ``1..num_items``, in order),
    ``clients[j]`` the client that holds it and ``included[j]`` whether that client trains on it.
    """

    histories: np.ndarray  # (m, length) int64
    clients: tuple[str, ...]
    included: np.ndarray  # (m,) bool
    num_items: int

    def __post_init__(self) -> None:
        m = len(self.histories)
        if self.histories.ndim != 2 or len(self.clients) != m or self.included.shape != (m,):
            raise ValueError(f"canaries: histories {self.histories.shape}, {len(self.clients)} clients and "
                             f"included {self.included.shape} must describe the same number of canaries")
        if m and (self.histories.min() < 1 or self.histories.max() > self.num_items):
            raise ValueError(f"canary item ids must be in 1..{self.num_items} (the catalogue), got "
                             f"{self.histories.min()}..{self.histories.max()}")

    def __len__(self) -> int:
        return len(self.histories)

    def of_client(self, client: str) -> list[np.ndarray]:
        """The histories client ``client`` trains on (its included canaries)."""
        return [self.histories[j] for j in range(len(self)) if self.included[j] and self.clients[j] == client]

    def to_dict(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "histories": self.histories.tolist(),
                "clients": list(self.clients), "included": [bool(b) for b in self.included]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Canaries:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(histories=np.asarray(data["histories"], dtype=np.int64).reshape(len(data["histories"]), -1),
                       clients=tuple(str(c) for c in data["clients"]),
                       included=np.asarray(data["included"], dtype=bool), num_items=int(data["num_items"]))
        except FileNotFoundError:
            raise FileNotFoundError(f"canary file {path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a canary file ({err})") from None


def make_canaries(*, num: int, length: int, num_items: int, clients: Sequence[str],
                  seed: int | None = None) -> Canaries:
    """``num`` canary users of ``length`` distinct random items, spread round-robin over
    ``clients`` (in a random order), each included with probability 1/2.

    ``seed`` is for tests only: by default the generator is seeded with 128 bits of OS randomness
    (``secrets``), so that the inclusion bits cannot be predicted.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num (canaries) must be an int >= 1, got {num!r}")
    if isinstance(length, bool) or not isinstance(length, int) or not 3 <= length <= num_items:
        raise ValueError(f"length (canary history) must be an int in [3, {num_items}] (the catalogue size), "
                         f"got {length!r}")
    if not clients:
        raise ValueError("clients must name at least one client to hold the canaries")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    histories = np.stack([rng.choice(num_items, size=length, replace=False) + 1 for _ in range(num)])  # (m, L)
    order = rng.permutation(num)
    holders = tuple(clients[int(order[j]) % len(clients)] for j in range(num))
    included = rng.random(num) < 0.5  # (m,)
    return Canaries(histories=histories.astype(np.int64), clients=holders, included=included, num_items=num_items)


def canary_scores(model: Any, histories: np.ndarray, *, max_len: int, batch_size: int = 256) -> np.ndarray:
    """Membership score of each canary: the mean log-likelihood ``(1/(T-1)) sum_t log p(s_{t+1} | s_1..s_t)``
    the model (a ``core_model.model.SASRec``, in eval mode) gives to the training part of its
    history (all but the last two items, which leave-one-out holds out, as for every user).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    train = np.asarray(histories)[:, :-2]  # (m, L - 2): what a member was trained on
    train = train[:, -(max_len + 1):]
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(train), batch_size):
                chunk = torch.as_tensor(train[start:start + batch_size], device=device)  # (B, T + 1)
                inputs, targets = chunk[:, :-1], chunk[:, 1:]  # (B, T)
                logits = model.item_logits(model.encode(inputs)).float()  # (B, T, V + 1)
                ll = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
                out.append(ll.mean(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` (``m`` canaries, each included with
    probability 1/2) if the run is (``epsilon``, ``delta``)-DP: ``beta + alpha * 2m * delta``
    (Steinke, Nasr & Jagielski 2023, Theorem 5.2 and their Algorithm for the p-value).
    """
    from scipy import stats

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, tail = 0.0, 0.0
    pmf = stats.binom.pmf(np.arange(v), r, q) if v else np.zeros(0)  # P[Binomial = 0..v-1]
    for i in range(1, v + 1):
        tail += float(pmf[v - i])  # P[v - i <= Binomial < v]
        alpha = max(alpha, tail / i)
    return min(1.0, beta + alpha * 2 * m * delta)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, significance: float = SIGNIFICANCE) -> float:
    """The largest epsilon at which ``v`` correct of ``r`` guesses has p-value below ``significance``
    (0 when even epsilon = 0 is not rejected): with confidence ``1 - significance`` the run is not
    (epsilon, ``delta``)-DP for any smaller epsilon. Bisection to 1e-6.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance!r}")
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < significance:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # every guess right, r large: the bound grows like log(r); never this large
            return lo
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessResult:
    """One guess size of the grid: ``k`` in and ``k`` out guesses, ``correct`` of them right."""

    k: int
    guesses: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class EmpiricalAudit:
    """The outcome of :func:`audit_scores`."""

    canaries: int
    members: int
    delta: float
    significance: float
    epsilon_lower_bound: float
    best: GuessResult
    grid: tuple[GuessResult, ...]
    auc: float
    mean_score_members: float
    mean_score_nonmembers: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def guess_sizes(m: int) -> list[int]:
    """The grid of ``k`` (guesses on each side) for ``m`` canaries: :data:`GUESS_FRACTIONS` of
    ``m``, at least 1, at most ``m // 2``, without repeats."""
    return sorted({min(max(1, round(f * m)), max(1, m // 2)) for f in GUESS_FRACTIONS})


def audit_scores(scores: np.ndarray, included: np.ndarray, *, delta: float,
                 significance: float = SIGNIFICANCE) -> EmpiricalAudit:
    """Guess membership from ``scores`` (higher = member) and turn the guesses into a lower bound.

    For each ``k`` of :func:`guess_sizes`: "in" for the ``k`` highest scores, "out" for the ``k``
    lowest; the bound at significance ``significance / len(grid)``; the result is the best over the
    grid (Bonferroni: valid at ``significance`` overall).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or included.shape != (m,):
        raise ValueError(f"need scores and inclusion bits for the same >= 2 canaries, got {m} scores and "
                         f"{included.shape} bits")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite (a NaN or inf score cannot be ranked)")
    order = np.argsort(-scores, kind="stable")  # highest first
    sizes = guess_sizes(m)
    level = significance / len(sizes)
    grid = []
    for k in sizes:
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        eps = epsilon_lower_bound(m=m, r=2 * k, v=correct, delta=delta, significance=level)
        grid.append(GuessResult(k=k, guesses=2 * k, correct=correct, epsilon_lower_bound=eps))
    best = max(grid, key=lambda g: g.epsilon_lower_bound)
    members, non = scores[included], scores[~included]
    if len(members) and len(non):  # AUC: P[member score > non-member score], ties count half
        ranks = _average_ranks(scores)
        auc = float((ranks[included].sum() - len(members) * (len(members) + 1) / 2) / (len(members) * len(non)))
    else:
        auc = float("nan")
    return EmpiricalAudit(canaries=m, members=int(included.sum()), delta=float(delta), significance=significance,
                          epsilon_lower_bound=best.epsilon_lower_bound, best=best, grid=tuple(grid), auc=auc,
                          mean_score_members=float(members.mean()) if len(members) else float("nan"),
                          mean_score_nonmembers=float(non.mean()) if len(non) else float("nan"))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank (for the Mann-Whitney AUC)."""
    from scipy.stats import rankdata
    return rankdata(x, method="average")


def default_delta(run_dir: str | Path, canaries: Canaries) -> float:
    """The delta DP-SGD would have stated for this run's federation: ``1 / (10 n)`` for the smallest
    client (``n`` its users plus its included canaries), the largest of the clients' deltas.
    For auditing a run without DP at the delta a DP run of the same layout states."""
    path = Path(run_dir) / "partition.json"
    try:
        sizes = json.loads(path.read_text())["sizes"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path}: cannot read the clients' sizes for the default delta ({err}); give delta") from None
    ns = [int(n) + len(canaries.of_client(str(name))) for name, n in sizes.items()]
    if not ns:
        raise ValueError(f"{path}: no clients; give delta")
    return accounting_default_delta(min(ns))


def empirical_audit(run_dir: str | Path, *, delta: float | None = None, claimed_epsilon: float | None = None,
                    significance: float = SIGNIFICANCE) -> dict[str, Any]:
    """The empirical audit of a run trained with canaries (``privacy.audit_canaries`` > 0).

    Scores every canary with the run's final model (``model.pt``), guesses membership and returns
    the lower bound with everything needed to read it (a JSON-able dict). ``delta``: the delta of
    the bound (default: the claimed delta given by the caller, else :func:`default_delta`).
    ``claimed_epsilon``: the run's claimed epsilon at that delta (None for a run without DP).
    """
    from core_model.train import load_checkpoint

    run_dir = Path(run_dir)
    path = run_dir / CANARY_FILE
    config = run_dir / "config.json"
    if config.is_file():  # a run may reuse another run's canaries (privacy.audit_canary_file)
        recorded = (json.loads(config.read_text()).get("privacy") or {}).get("audit_canary_file")
        path = Path(recorded) if recorded else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: this run was trained without canaries, so it cannot be "
                                "audited empirically. Train with canaries, e.g. fedrec simulate ... --set "
                                "privacy.audit_canaries=1000, then run fedrec audit RUN --empirical")
    canaries = Canaries.load(path)
    model, ckpt = load_checkpoint(run_dir / "model.pt")
    if model.config.num_items != canaries.num_items:
        raise ValueError(f"{path}: canaries drawn for {canaries.num_items} items, but {run_dir / 'model.pt'} scores "
                         f"{model.config.num_items}")
    delta = default_delta(run_dir, canaries) if delta is None else float(delta)
    scores = canary_scores(model, canaries.histories, max_len=model.config.max_len)
    result = audit_scores(scores, canaries.included, delta=delta, significance=significance)
    lb = result.epsilon_lower_bound
    if claimed_epsilon is None:
        verdict = (f"no DP claim to test (the run has no privacy ledgers); the model leaks at least epsilon "
                   f"{lb:.3g} at delta {delta:.3g} with confidence {1 - significance:.0%}")
        consistent = None
    else:
        consistent = lb <= claimed_epsilon
        verdict = (f"lower bound {lb:.3g} <= claimed {claimed_epsilon:.4g}: consistent with the claim" if consistent
                   else f"lower bound {lb:.3g} > claimed {claimed_epsilon:.4g}: the run leaks MORE than its ledgers "
                        "claim (a bug in the DP implementation or accounting, or a 1-in-"
                        f"{round(1 / significance)} chance)")
    return {
        "method": "Steinke, Nasr & Jagielski (NeurIPS 2023), one training run, black-box: canary users with "
                  "random histories, each included with probability 1/2; membership score = the final model's "
                  "mean log-likelihood of the canary's own next items; k highest guessed in, k lowest out, k on a "
                  f"fixed grid ({', '.join(f'{f:g}' for f in GUESS_FRACTIONS)} of the canaries) with a Bonferroni "
                  "correction",
        "unit": "one canary user (a whole history at one client), the unit of privacy the ledgers claim",
        "canary_file": str(path), "canary_length": int(canaries.histories.shape[1]),
        "clients_with_canaries": len(set(canaries.clients)), "rounds": ckpt.get("round"),
        "claimed_epsilon": claimed_epsilon, "consistent": consistent, "verdict": verdict,
        **result.to_dict(),
        "scores": {"members": [float(s) for s in scores[canaries.included]],
                   "non_members": [float(s) for s in scores[~canaries.included]]},
    }
