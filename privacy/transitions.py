"""A differentially private item-transition table: one Gaussian release of the users' clipped
transition counts, scored beside the Transformer (``model.transitions``).

What a user contributes. For a training history ``h_1 .. h_L`` (oldest first) and a window ``W``
(``model.transitions_window``), the user's matrix ``M_u`` (``(V + 1) x (V + 1)``, row and column 0 the
padding item) counts each ordered pair ``(h_t, h_{t+k})``, ``1 <= k <= W``, with weight
``decay ** (k - 1)`` (``model.transitions_decay``): what this user watched within ``W`` steps after
what. ``M_u`` is then scaled to Frobenius norm at most 1 (:func:`user_transitions`), so adding or
removing one user's whole history moves the sum ``sum_u M_u`` by at most 1 in L2 norm: the unit of
privacy is one user's whole history, as in DP-SGD.

The release. Each client sums its users' clipped matrices and adds Gaussian noise: of standard
deviation ``sigma`` (``privacy.transitions_noise_multiplier``) when every client adds all of it
(``privacy.noise_placement="local"``), or its share ``sigma / sqrt(t)`` when the sum is securely
aggregated over at least ``t`` clients (``"distributed"``, as for DP-SGD's steps). The server
learns only the sum ``T = sum_u M_u + N(0, sigma^2 I)`` (more noise with local placement): the
Gaussian mechanism with sensitivity 1, accounted as one step at sample rate 1 and noise multiplier
``sigma`` in the client's ledger before anything leaves, composed (PRV or RDP) with the DP-SGD steps
that follow. Everything the server does with ``T`` afterwards is post-processing: it zeroes the
padding row and column and keeps ``T`` in the model (``SASRec.transition_table``), which scores a
user's next item as the recency-weighted rows of their last items (``SASRec.transition_scores``).

Why. With DP-SGD each user's clipped gradient spreads its norm over ~200k parameters and the whole
softmax; a transition count spends the same unit norm on the few thousand pairs the user actually
has, so the noise is small next to the counts of common pairs (``benchmarks/transitions_prior.py``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch

from core_model.config import PrivacyConfig

TRANSITIONS_RECORD = "transitions"
"""The message record (ArrayRecord ``table``) with which the server sends the released table to
clients for evaluation; also the ConfigRecord key ``transitions-release`` marks the release request."""
RELEASE_FLAG = "transitions-release"
RELEASE_ROUND = 0
"""The release is the ledger's round 0: before the first training round."""


def release_history(privacy: PrivacyConfig) -> list[tuple[float, float, int]]:
    """The accountant history of the release: ``[(sigma, 1.0, 1)]``, or ``[]`` without one."""
    sigma = privacy.transitions_noise_multiplier
    return [(float(sigma), 1.0, 1)] if privacy.mode == "dp-sgd" and sigma > 0 else []


def release_mechanism(noise_multiplier: float, *, min_clients: int | None, window: int, decay: float) -> str:
    """The ledger's mechanism string for the release."""
    who = (f"this client adds 1/sqrt({min_clients}) of the noise and releases its sum only inside a securely "
           f"aggregated sum of at least {min_clients} clients (the recorded noise multiplier is the sum's)"
           if min_clients else "this client adds all of the noise to its own sum")
    return (f"Gaussian release of item transitions: each user's counts of (item, item k <= {window} steps later, "
            f"weight {decay:g}^(k-1)) scaled to Frobenius norm <= 1 (sensitivity 1), summed over the client's "
            f"users, Gaussian noise of multiplier {noise_multiplier:g}; {who}")


def user_transitions(history: np.ndarray, num_items: int, *, window: int,
                     decay: float) -> tuple[np.ndarray, np.ndarray]:
    """One user's clipped transition matrix, sparse: (flat indices into ``(V + 1) x (V + 1)``, values).

    The values' L2 norm is at most 1 (exactly 1 for any user with a pair); a history shorter than
    2 items contributes nothing. Item ids must be in ``1 .. num_items``.
    """
    h = np.asarray(history, dtype=np.int64)
    if h.ndim != 1:
        raise ValueError(f"a history must be 1-D, got shape {h.shape}")
    if h.size and (h.min() < 1 or h.max() > num_items):
        raise ValueError(f"history items must be in 1..{num_items}, got min {h.min()} max {h.max()}")
    keys, weights = [], []
    for k in range(1, window + 1):
        if h.size <= k:
            break
        keys.append(h[:-k] * (num_items + 1) + h[k:])
        weights.append(np.full(h.size - k, decay ** (k - 1)))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0)
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    values = np.bincount(inverse, weights=np.concatenate(weights))
    norm = float(np.linalg.norm(values))
    return unique, values / max(norm, 1.0)


def client_transitions(histories: Sequence[np.ndarray], num_items: int, *, window: int,
                       decay: float) -> np.ndarray:
    """The sum of the client's users' clipped matrices: dense ``(V + 1, V + 1)`` float64, no noise."""
    check_settings(window=window, decay=decay)
    size = (num_items + 1) ** 2
    keys, values = [], []
    for history in histories:
        k, v = user_transitions(history, num_items, window=window, decay=decay)
        keys.append(k)
        values.append(v)
    if not keys:
        return np.zeros((num_items + 1, num_items + 1))
    total = np.bincount(np.concatenate(keys), weights=np.concatenate(values), minlength=size)
    return total.reshape(num_items + 1, num_items + 1)


def add_noise(total: np.ndarray, std: float, generator: torch.Generator | None = None) -> np.ndarray:
    """``total`` + N(0, std^2) per entry, from an OS-seeded generator (the server knows the run's seed)."""
    if not std >= 0 or math.isinf(std):
        raise ValueError(f"noise standard deviation must be a finite number >= 0, got {std!r}")
    if std == 0:
        return total.copy()
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.randn(total.shape, generator=generator, dtype=torch.float64).numpy()
    return total + std * noise


def finish_table(total: np.ndarray) -> torch.Tensor:
    """The server's post-processing of the released sum: float32, padding row and column zeroed."""
    table = torch.as_tensor(np.asarray(total), dtype=torch.float32).clone()
    if table.dim() != 2 or table.shape[0] != table.shape[1]:
        raise ValueError(f"the transition sum must be a square matrix, got shape {tuple(table.shape)}")
    if not bool(torch.isfinite(table).all()):
        raise ValueError("the transition sum has non-finite entries")
    table[0, :] = 0.0
    table[:, 0] = 0.0
    return table


def check_settings(*, window: int, decay: float) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"model.transitions_window must be an int >= 1, got {window!r}")
    if not 0 < decay <= 1:
        raise ValueError(f"model.transitions_decay must be in (0, 1], got {decay!r}")
