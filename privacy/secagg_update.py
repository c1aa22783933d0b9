"""What a client puts into a securely aggregated round, and how the server reads the sum back.

In a round with global weights ``w``, client ``k`` (``n_k`` users, the FedAvg weight) trains to
``w_k`` and contributes the vector

    x_k = [ n_k * (w_k - w)  flattened over the shareable state (the global model's key order),  n_k ]

quantized with :class:`privacy.secagg.Quantizer`. Secure aggregation gives the server only
``sum_{k in S} x_k`` over the surviving clients ``S``; its last coordinate is ``N = sum_{k in S}
n_k``, so

    delta = sum_{k in S} n_k (w_k - w) / N,    w + delta = sum_{k in S} (n_k / N) w_k,

which is FedAvg over ``S`` (McMahan et al., AISTATS 2017) expressed as a delta. Sending
``n_k * (w_k - w)`` rather than ``w_k`` keeps the coordinates small (an update, not a weight) and
needs no weights from the server in advance: the server learns ``N`` from the same sum.

Precision. Every coordinate of ``x_k`` must lie in ``[-bound, bound]``; a coordinate beyond it is an
error naming the client, the parameter, the index, the value and the bound (never clipped: a
clipped update would silently bias the average). ``n_k`` is an integer and is summed exactly.
Rounding to ``2**-scale_bits`` costs at most ``2**-(scale_bits + 1)`` per coordinate and client, so
the delta is within ``m * 2**-(scale_bits + 1) / N`` of the exact FedAvg delta for ``m`` surviving
clients (``<= 2**-(scale_bits + 1)`` since ``N >= m``; default 24 bits: ``3.0e-8``).

No Flower imports: the client and server adapters translate these arrays to and from messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from privacy.secagg import Quantizer


@dataclass(frozen=True)
class UpdateLayout:
    """Names and shapes of the model's shareable state, in the order the vector lays them out."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes) or not self.names:
            raise ValueError(f"an update layout needs one shape per name and at least one name, got "
                             f"{len(self.names)} names and {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"update layout names must be distinct, got {list(self.names)}")

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> UpdateLayout:
        """The layout of ``state`` (name -> array), in its own key order."""
        return cls(names=tuple(state), shapes=tuple(tuple(np.shape(v)) for v in state.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def length(self) -> int:
        """Coordinates of a contribution: every parameter element, then the weight ``n_k``."""
        return sum(self.sizes) + 1

    def check(self, state: Mapping[str, np.ndarray], what: str) -> None:
        """``state`` has exactly this layout's names and shapes (else a ``ValueError`` naming them)."""
        missing, unexpected = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise ValueError(f"{what} does not match the round's model: missing {missing}, unexpected {unexpected}")
        for name, shape in zip(self.names, self.shapes):
            if tuple(np.shape(state[name])) != shape:
                raise ValueError(f"{what}: {name!r} has shape {tuple(np.shape(state[name]))}, the round's "
                                 f"model has {shape}")


def encode_update(layout: UpdateLayout, *, local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray],
                  weight: int, quantizer: Quantizer, client: str) -> np.ndarray:
    """``x_k = [n_k (w_k - w), n_k]`` quantized: a 1-D uint64 vector of ``layout.length``.

    Raises ``ValueError`` naming ``client``, the parameter, the element, the value and the bound
    for the first coordinate outside ``[-quantizer.bound, quantizer.bound]`` or not finite.
    """
    layout.check(local, f"client {client}'s trained weights")
    layout.check(global_, "the global weights")
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 1:
        raise ValueError(f"client {client}: weight (number of users) must be an int >= 1, got {weight!r}")
    bound = quantizer.bound
    if weight > bound:
        raise ValueError(f"client {client}: its weight n_k = {int(weight)} users exceeds the secure aggregation "
                         f"bound {bound:g} (privacy.secagg_bound); raise the bound")
    parts = []
    for name in layout.names:
        change = np.asarray(local[name], dtype=np.float64) - np.asarray(global_[name], dtype=np.float64)
        contribution = float(weight) * change  # (shape of the parameter)
        bad = np.flatnonzero(~(np.abs(contribution) <= bound))  # NaN compares False: caught too
        if bad.size:
            index = tuple(int(i) for i in np.unravel_index(int(bad[0]), contribution.shape))
            value = float(contribution.reshape(-1)[bad[0]])
            raise ValueError(
                f"client {client}: {name}{list(index)} contributes n_k * (w_local - w_global) = {value:.6g} "
                f"({int(weight)} users x change {float(change.reshape(-1)[bad[0]]):.6g}), outside the secure "
                f"aggregation bound [-{bound:g}, {bound:g}] (privacy.secagg_bound); nothing is clipped"
                + (f" ({bad.size} coordinates of {name} are outside)" if bad.size > 1 else ""))
        parts.append(contribution.reshape(-1))
    parts.append(np.array([float(weight)]))
    return quantizer.quantize(np.concatenate(parts))  # (L,) uint64


def decode_sum(layout: UpdateLayout, total: np.ndarray, *,
               quantizer: Quantizer) -> tuple[dict[str, np.ndarray], float]:
    """The unmasked sum -> (the FedAvg delta per parameter, float64; ``N``, the summed weight)."""
    if total.shape != (layout.length,):
        raise ValueError(f"the aggregate has {total.shape} coordinates, the round's layout {layout.length}")
    values = quantizer.dequantize(total)  # (L,) float64
    weight = float(values[-1])
    if not weight >= 1 or weight != round(weight):
        raise ValueError(f"the aggregate's weight coordinate is {weight!r}, expected the clients' summed "
                         "number of users (an integer >= 1)")
    delta, offset = {}, 0
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes):
        delta[name] = (values[offset:offset + size] / weight).reshape(shape)
        offset += size
    return delta, weight
