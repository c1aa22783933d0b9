"""Privacy accounting for user-level DP-SGD at one federated client.

What is protected
-----------------
The unit of privacy is **one user's whole history at this client**: every interaction the user
has in the client's data, in every round. Each local step samples users with Poisson sampling at
rate ``q`` (``sample_rate``), clips each sampled user's gradient (summed over their whole
sequence) to L2 norm ``C``, sums the clipped gradients and adds Gaussian noise
``N(0, (sigma * C)^2 I)`` with ``sigma = noise_multiplier`` (DP-SGD, Abadi et al., CCS 2016, Alg. 1,
with users in place of examples as in user-level DP-FedAvg, McMahan et al., ICLR 2018). Each step is
a Poisson-subsampled Gaussian mechanism; ``steps`` of them compose.

Neighbouring data sets differ by adding or removing one user's whole history (Opacus' and
dp-accounting's default relation). The guarantee is ``(epsilon, delta)``-DP: for every set ``S`` of
outputs, ``P[M(D) in S] <= exp(epsilon) * P[M(D') in S] + delta``. ``delta`` is the probability
mass on which that bound may fail, so it must be well below ``1 / num_users``
(:func:`default_delta` uses ``1 / (10 * num_users)``).

Who it protects against
-----------------------
The epsilon reported here protects this client's users against **everyone who sees the client's
released updates**: the server, the other clients, and anyone who obtains a model built from them
(the final global model included). Aggregation and everything downstream of the noisy update are
post-processing and cost no further privacy. It says nothing about a user whose history is also
held by another client (each client's epsilon covers its own copy; the two compose).

Accountants
-----------
Both accountants read the same history of ``(noise_multiplier, sample_rate, steps)`` (Opacus'
``accountant.history`` layout):

* ``"prv"`` (default, the number to report): the privacy loss random variable accountant of
  Gopi, Lee & Wutschitz (NeurIPS 2021), :class:`opacus.accountants.PRVAccountant`; numerically
  tight (returns its upper bound).
* ``"rdp"``: Renyi DP of the subsampled Gaussian (Mironov, CSF 2017; Mironov, Talwar & Zhang 2019)
  converted to ``(epsilon, delta)``, :class:`opacus.accountants.RDPAccountant`; a looser upper
  bound (sigma 1.0, q 0.1, 1000 steps, delta 1/600: RDP 21.23 vs PRV 19.02).

A fresh Opacus ``PrivacyEngine`` starts its accountant at zero; a Flower client may be a fresh
process every round, so :class:`PrivacyAccountant` is plain data (``state_dict`` /
``from_state_dict``) and is rebuilt from the client's ledger (:mod:`privacy.ledger`) each round.

Opacus is imported only when an epsilon or a noise multiplier is computed.

Speed: both accountants start from the Renyi DP of one step, ``rdp(q, sigma)`` at Opacus' default
orders (the PRV accountant sizes its discretisation domain with it, Gopi et al. remark 5.6), and
``steps`` steps cost ``steps * rdp(q, sigma)``. That vector is computed once per ``(sigma, q)`` in a
process (a Python series per fractional order, ~0.3 s) and reused: a client's epsilon after every
round, and every candidate of a noise-multiplier search, then cost the PRV composition alone. The
numbers are exactly Opacus' (same functions, same order of operations; tested bit for bit).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ACCOUNTANTS = ("prv", "rdp")
"""Accountant names accepted by :meth:`PrivacyAccountant.epsilon` (``"prv"`` is the default)."""


def default_delta(num_users: int) -> float:
    """``1 / (10 * num_users)``: a delta well below the weight of one user among ``num_users``."""
    if isinstance(num_users, bool) or not isinstance(num_users, numbers.Integral) or num_users < 1:
        raise ValueError(f"num_users must be an int >= 1, got {num_users!r}")
    return 1.0 / (10 * int(num_users))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_step(noise_multiplier: Any, sample_rate: Any, steps: Any) -> tuple[float, float, int]:
    """Validate one history entry; return it as ``(float, float, int)``."""
    if not _is_number(noise_multiplier) or not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not _is_number(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    return float(noise_multiplier), float(sample_rate), int(steps)


def _check_delta(delta: Any) -> float:
    if not _is_number(delta) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> Any:
    """Renyi DP of one Poisson-subsampled Gaussian step at Opacus' default orders (read-only array)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """``RDPAccountant(history).get_epsilon(delta)``, from the cached one-step vectors.

    ``compute_rdp(steps=n)`` is ``rdp * n`` and ``rdp * 1 == rdp``, summed in history order from 0
    as Opacus sums: the same floating-point result.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_rdp_one_step(float(sigma), float(q)) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.cache
def _prv_accountant_class() -> type:
    """Opacus' ``PRVAccountant`` with its discretisation domain sized from the cached RDP vectors.

    Opacus 1.6 sizes the domain (``compute_safe_domain_size``, Gopi et al. remark 5.6) with fresh
    ``RDPAccountant`` s every call: the RDP epsilon of the whole history at ``delta_error / 4`` and of
    one step of each entry at ``delta_error / (8 * total steps)``, the largest of them (at least
    ``eps_error``) plus 3 is the half-width; the mesh is ``eps_error / sqrt(total * log(12 /
    delta_error) / 2)``. The same here, from :func:`_rdp_epsilon`; everything after the domain is
    Opacus' own code. ``tests/privacy/test_accounting.py`` checks the epsilon equals stock Opacus'
    exactly, so a change in Opacus' sizing fails there instead of silently changing a number.
    """
    import numpy as np
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class CachedDomainPRVAccountant(PRVAccountant):
        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):  # type: ignore[override]
            total = sum(num_self_compositions)
            entries = [(prv.noise_multiplier, prv.sample_rate, n) for prv, n in zip(prvs, num_self_compositions)]
            half_width = _rdp_epsilon(entries, delta_error / 4)
            for prv in prvs:
                half_width = max(half_width, _rdp_epsilon([(prv.noise_multiplier, prv.sample_rate, 1)],
                                                          delta_error / (8 * total)))
            half_width = max(half_width, eps_error) + 3
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-half_width, half_width, mesh_size)

    return CachedDomainPRVAccountant


def _epsilon(history: Sequence[tuple[float, float, int]], delta: float, name: str) -> float:
    """Epsilon of a non-empty, noisy ``history`` at ``delta`` by accountant ``name`` (validated)."""
    if name == "rdp":
        return _rdp_epsilon(history, delta)
    accountant = _prv_accountant_class()()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """The privacy spent by one client: a history of ``(noise_multiplier, sample_rate, steps)``.

    ``add`` appends one block of steps, merging it into the last entry when noise and rate are
    equal (as Opacus' ``step`` does), so 20 rounds of 50 steps at one setting are one entry of
    1000 steps, exactly what one long run would have recorded.

    >>> acc = PrivacyAccountant()
    >>> acc.add(noise_multiplier=1.0, sample_rate=0.1, steps=500)
    >>> acc.add(noise_multiplier=1.0, sample_rate=0.1, steps=500)
    >>> acc.history, acc.steps
    ([(1.0, 0.1, 1000)], 1000)
    """

    def __init__(self, history: Iterable[tuple[float, float, int]] = ()) -> None:
        self._history: list[tuple[float, float, int]] = []
        for entry in history:
            noise_multiplier, sample_rate, steps = entry
            self.add(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """A copy of the history, oldest first."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of noisy steps recorded."""
        return sum(steps for _, _, steps in self._history)

    def add(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` steps at ``noise_multiplier`` and ``sample_rate`` (validated first).

        ``steps == 0`` records nothing.
        """
        entry = _check_step(noise_multiplier, sample_rate, steps)
        if entry[2] == 0:
            return
        if self._history and self._history[-1][:2] == entry[:2]:
            last = self._history.pop()
            entry = (last[0], last[1], last[2] + entry[2])
        self._history.append(entry)

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """Epsilon spent so far at ``delta``: 0.0 when nothing was spent, ``inf`` after any
        noiseless step (no privacy), otherwise the Opacus ``accountant``'s ``get_epsilon``."""
        delta = _check_delta(delta)
        name = _check_accountant(accountant)
        if not self._history:
            return 0.0
        if any(noise == 0 for noise, _, _ in self._history):
            return math.inf
        return _epsilon(self._history, delta, name)

    def state_dict(self) -> dict[str, list[list[float | int]]]:
        """``{"history": [[noise_multiplier, sample_rate, steps], ...]}`` (JSON-able)."""
        return {"history": [list(entry) for entry in self._history]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        """Inverse of :meth:`state_dict`. Also reads an Opacus accountant's ``state_dict()``
        (its extra ``"mechanism"`` key is ignored: the history means the same to every accountant)."""
        if not isinstance(state, Mapping) or "history" not in state:
            raise ValueError(f"state must be a mapping with a 'history' key, got {state!r}")
        unknown = sorted(set(state) - {"history", "mechanism"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in accountant state; expected 'history'")
        history = state["history"]
        if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
            raise ValueError(f"history must be a list of [noise_multiplier, sample_rate, steps], got {history!r}")
        entries = []
        for k, entry in enumerate(history):
            ok = not isinstance(entry, (str, bytes, Mapping)) and isinstance(entry, Iterable)
            if not ok or len(entry := tuple(entry)) != 3:
                raise ValueError(f"history[{k}] must be [noise_multiplier, sample_rate, steps], got {entry!r}")
            entries.append(entry)
        return cls(entries)

    def __repr__(self) -> str:
        return f"PrivacyAccountant(history={self._history!r})"


def noise_for_target_epsilon(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    preceding: Sequence[tuple[float, float, int]] = (),
) -> float:
    """The noise multiplier with which ``steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    ``preceding``: history entries ``(noise_multiplier, sample_rate, steps)`` spent before these
    steps (the transition table's release): the steps then spend what they leave of the target,
    composed by the same accountant.

    Plan the whole horizon once (all rounds' steps together) and use the returned sigma in every
    round: the epsilon after the last round is then ``target_epsilon - epsilon_tolerance <= eps <=
    target_epsilon``. Calling this per round with the per-round steps (as a per-round
    ``make_private_with_epsilon`` does) would spend ``target_epsilon`` every round.

    Binary search as :func:`opacus.accountants.utils.get_noise_multiplier` does it (the same
    bracket, doubling from 20, and the same bisection, so the same sigma), with each candidate's
    epsilon from this module's accountants (the one-step RDP is computed once per candidate, not
    once per candidate and client).
    """
    if not _is_number(target_epsilon) or not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    name = _check_accountant(accountant)
    _check_step(0.0, sample_rate, steps)
    if steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not _is_number(epsilon_tolerance) or not 0 < epsilon_tolerance < target_epsilon:
        raise ValueError(f"epsilon_tolerance must be in (0, target_epsilon), got {epsilon_tolerance!r}")
    from opacus.accountants.utils import MAX_SIGMA

    pre = [_check_step(*entry) for entry in preceding]
    if pre and (spent := PrivacyAccountant(pre).epsilon(delta, name)) >= target_epsilon - epsilon_tolerance:
        raise ValueError(f"what is spent before the DP-SGD steps ({pre}) already costs epsilon {spent:.4g} at "
                         f"delta={delta!r}, which leaves nothing of target_epsilon={target_epsilon!r}")
    target, q, steps = float(target_epsilon), float(sample_rate), int(steps)
    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target:
        sigma_high = 2 * sigma_high
        eps_high = _epsilon([*pre, (sigma_high, q, steps)], delta, name)
        if sigma_high > MAX_SIGMA:
            raise ValueError(f"no noise multiplier up to {MAX_SIGMA:g} reaches target_epsilon={target_epsilon!r} at "
                             f"delta={delta!r} over {steps} steps at sample_rate={sample_rate!r}")
    while target - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = _epsilon([*pre, (sigma, q, steps)], delta, name)
        if eps < target:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


@functools.lru_cache(maxsize=256)
def sample_rate_for_target_epsilon(
    *,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The largest Poisson sample rate with which ``steps`` steps at ``noise_multiplier`` spend ``target_epsilon``.

    The counterpart of :func:`noise_for_target_epsilon` for a noise multiplier that is fixed, as it
    is when every client's noise share must add up to one multiplier (distributed noise): a client
    then spends its whole budget by sampling its users at the returned rate ``q``, for which
    ``target_epsilon - epsilon_tolerance <= eps(q) <= target_epsilon``; or ``q = 1`` when even
    sampling every user at every step spends no more than the target. Bisection on ``q`` (epsilon
    grows with ``q``), each candidate's epsilon from this module's accountants. Cached per process:
    a client plans with it every round.
    """
    if not _is_number(target_epsilon) or not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    name = _check_accountant(accountant)
    _check_step(noise_multiplier, 1.0, steps)
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 (no noise spends infinite epsilon), got {noise_multiplier!r}")
    if steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not _is_number(epsilon_tolerance) or not 0 < epsilon_tolerance < target_epsilon:
        raise ValueError(f"epsilon_tolerance must be in (0, target_epsilon), got {epsilon_tolerance!r}")
    target, sigma, steps = float(target_epsilon), float(noise_multiplier), int(steps)
    if _epsilon([(sigma, 1.0, steps)], delta, name) <= target:
        return 1.0
    q_low, eps_low, q_high = 0.0, 0.0, 1.0
    while target - eps_low > epsilon_tolerance:
        q = (q_low + q_high) / 2
        if q_high - q_low < 1e-12:
            raise ValueError(f"no sample rate reaches target_epsilon={target_epsilon!r} within {epsilon_tolerance!r} "
                             f"at noise_multiplier={noise_multiplier!r}, delta={delta!r}, {steps} steps")
        eps = _epsilon([(sigma, q, steps)], delta, name)
        if eps <= target:
            q_low, eps_low = q, eps
        else:
            q_high = q
    return q_low
