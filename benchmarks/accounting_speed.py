"""What a client's epsilon costs per round, and the noise-multiplier search, against stock Opacus.

    python benchmarks/accounting_speed.py [--rounds 150] [--repeats 3]

Every round a client appends one block of steps to its history and reports its cumulative epsilon
(``privacy.accounting.PrivacyAccountant.epsilon``, PRV by default); a distributed-noise simulation
also searches each client's noise multiplier once at the start (``shared_noise_multiplier``). Both
used to rebuild the Renyi DP of one step (a Python series per fractional order) on every call; now
it is cached per ``(sigma, q)``. This script times, in one process and interleaved:

1. the epsilon after round r = 1..``--rounds`` (one step per round at sigma 3.477, q 1/2, delta
   6.8e-5: the ML-1M distributed-noise configuration), ours against a fresh
   ``opacus.accountants.PRVAccountant`` with the same history, and checks they are equal;
2. the noise-multiplier search for the 10 ML-1M region clients' deltas (epsilon 8, q 1/2, 150
   steps), ours (``noise_for_target_epsilon``) against ``opacus.accountants.utils.get_noise_multiplier``,
   and checks the multipliers are equal.

It prints medians and their ratio (the machine is shared; ratios, not absolute times, are the figure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privacy import accounting  # noqa: E402
from privacy.accounting import PrivacyAccountant, noise_for_target_epsilon  # noqa: E402

# ML-1M, 10 region clients (partition.json of a run): their numbers of users (delta = 1 / (10 n) each)
CLIENT_SIZES = (662, 662, 441, 386, 607, 659, 430, 419, 306, 1468)


def _medians(stock: list[float], ours: list[float], scale: float, unit: str) -> str:
    """``median X stock, Y ours: Rx`` (the ratio is the figure: the machine is shared)."""
    a, b = statistics.median(stock), statistics.median(ours)
    return f"median {a * scale:.1f} {unit} stock, {b * scale:.1f} {unit} ours: {a / b:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3, help="noise searches, each side")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Opacus' "optimal order is the largest alpha" at small deltas
    from opacus.accountants import PRVAccountant
    from opacus.accountants.utils import get_noise_multiplier

    sigma, q, delta = 3.477, 0.5, 6.8e-5
    ours_t, stock_t = [], []
    acc = PrivacyAccountant()
    for r in range(1, args.rounds + 1):
        acc.add(noise_multiplier=sigma, sample_rate=q, steps=1)
        stock = PRVAccountant()
        stock.history = acc.history
        t = time.perf_counter()
        expected = stock.get_epsilon(delta)
        stock_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = acc.epsilon(delta)
        ours_t.append(time.perf_counter() - t)
        if got != expected:
            raise SystemExit(f"round {r}: epsilon {got} != stock Opacus {expected}")
    print(f"epsilon after each of {args.rounds} rounds (sigma {sigma}, q {q}, delta {delta}; final {got:.4f}, equal "
          f"to stock Opacus every round): {_medians(stock_t, ours_t, 1e3, 'ms')}")

    ours_s, stock_s = [], []
    for _ in range(args.repeats):
        accounting._rdp_one_step.cache_clear()  # a fresh process: nothing cached yet
        t = time.perf_counter()
        mine = [noise_for_target_epsilon(target_epsilon=8.0, delta=1 / (10 * n), sample_rate=q, steps=150)
                for n in CLIENT_SIZES]
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = [get_noise_multiplier(target_epsilon=8.0, target_delta=1 / (10 * n), sample_rate=q, steps=150,
                                       accountant="prv", epsilon_tolerance=0.01) for n in CLIENT_SIZES]
        stock_s.append(time.perf_counter() - t)
        if mine != theirs:
            raise SystemExit(f"noise multipliers differ: {mine} vs {theirs}")
    print(f"noise search for the {len(CLIENT_SIZES)} clients (epsilon 8, q {q}, 150 steps; largest multiplier "
          f"{max(mine):.4f}, equal to Opacus'): {_medians(stock_s, ours_s, 1.0, 's')}")


if __name__ == "__main__":
    main()
