"""Secure aggregation (SecAgg+): the protocol math, without Flower.

The server learns the sum of the clients' quantized update vectors and nothing else about any one
of them, even when clients drop out at any stage. This is SecAgg+ (Bell, Bonawitz, Gascon,
Lepoint & Raykova, CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
Sect. 3-4) on top of the SecAgg protocol of Bonawitz et al. (CCS 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", Fig. 4, the honest-but-curious version):
each client masks its vector with pairwise masks shared with its **neighbours** in a sparse,
random, ``k``-regular communication graph (``k = O(log n)``) instead of with every other client,
plus a self mask; both mask secrets are Shamir-shared among the neighbours so that the server can
remove the masks of clients that drop out.

Threat model
------------
Honest-but-curious server and clients (they follow the protocol and try to learn from what they
see); any client may drop out at any moment. What the server sees: public keys, ciphertexts of
shares it cannot open, masked vectors that are uniformly random on their own (each carries a
self mask from a fresh 32-byte seed), and the shares it asks for at unmasking. Not covered: a
*malicious* server that lies about who dropped (that needs the consistency-check round and
signed keys of Bonawitz et al. Sect. 6, or SecAgg+'s authenticated variant; not implemented),
and clients that collude with the server beyond the threshold (below).

Stages (a client absent from a stage's replies, or whose reply the server rejects, has dropped)
-----------------------------------------------------------------------------------------------
Sets: ``U0`` all clients, ``U1`` advertised keys, ``U2`` shared keys, ``U3`` sent a masked input,
``U4`` answered the unmasking request; ``N(u)`` is ``u``'s neighbourhood, ``t`` the threshold.

0. *advertise_keys*: each client makes two X25519 key pairs, ``c`` (to encrypt shares) and ``s``
   (to agree pairwise masks), and sends both public keys (raw 32 bytes).
1. *share_keys*: the server sends ``u`` the keys of ``N(u) & U1``. The client refuses (aborts) if
   fewer than ``t`` are left or if ``t`` is not more than half its neighbourhood; otherwise it draws
   a self-mask seed ``b_u`` (32 bytes), Shamir-shares ``b_u`` and its ``s`` private key with
   threshold ``t`` among those neighbours and encrypts each neighbour's pair of shares with
   ChaCha20-Poly1305 (key: HKDF-SHA256 of ``X25519(c_u, c_v)``; random 12-byte nonce; associated
   data binding round, sender and receiver).
2. *masked_input*: ``u`` receives the ciphertexts addressed to it (senders ``N(u) & U2``),
   decrypts and keeps the shares, and sends ``y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv)``
   mod ``2**64`` over ``v`` in ``N(u) & U2``, with ``sign = +1`` if ``u < v`` else ``-1`` and
   ``s_uv = HKDF-SHA256(X25519(s_u, s_v))`` bound to the round and both ids. Pairwise masks of two
   clients in ``U3`` cancel in the sum. A ciphertext that fails authentication (or holds shares
   outside the field) is *refused*: ``u`` masks without that sender, keeps none of its shares and
   names it in its reply (``refused``), as long as ``t`` senders remain. The server then leaves
   the refused sender's masked input out (it counts as dropped at this stage, in
   :attr:`SecAggServer.rejected`) and removes its pairwise masks with the clients that did mask
   with it, as for any dropout; so one client's bad ciphertexts cannot make all its neighbours
   drop.
3. *unmasking*: the server tells ``u`` which neighbours it masked with survived (``M(u) & U3``) and
   which dropped (``M(u) - U3``), ``M(u)`` being its senders less those it refused. The client
   checks that the two sets are disjoint and together are exactly the neighbours it masked with
   (``M(u)``), then returns its share of ``b_v`` for each
   survivor and of ``s_v`` for each dropped neighbour, never both for the same neighbour, and
   answers at most one such request per round. The server reconstructs every needed secret from
   ``t`` shares, removes the self masks of ``U3`` and the pairwise masks between ``U3`` and the
   dropped clients, and obtains exactly ``sum_{u in U3} x_u``.

If a needed secret has fewer than ``t`` shares, :class:`SecAggAborted` names its owner and the
count; a wrong or partial sum is never returned.

Messages are flat dicts of ``str`` -> ``int`` / ``str`` / ``bytes`` / lists of one of those, so that
they map onto Flower ``ConfigRecord`` s (note: ``ConfigRecord`` ints are signed 64-bit, so an
adapter should number the clients ``1..n`` rather than pass Flower's unsigned node ids). Every
server-to-client message carries ``"stage"`` (a name in :data:`STAGES`) and ``"round"``:

====================  ==========================================================================
advertise_keys        request ``{}``; reply ``{"c_pk": bytes, "s_pk": bytes}``
share_keys            request ``{"threshold", "neighbours", "alive", "c_pks", "s_pks"}``;
                      reply ``{"receivers": [id], "ciphertexts": [bytes]}``
masked_input          request ``{"length", "senders", "ciphertexts"}``;
                      reply ``{"masked": bytes}`` (``length`` little-endian uint64), plus
                      ``"refused": [id]`` when some senders' ciphertexts were refused
unmasking             request ``{"survivors": [id], "dropped": [id]}``; reply ``{"seed_owners",
                      "seed_shares", "key_owners", "key_shares"}`` (shares: 66-byte big-endian)
====================  ==========================================================================

Communication graph, degree and threshold
-----------------------------------------
:func:`choose_graph` builds a Harary graph: the clients in a uniformly random order (OS
randomness) on a ring, each joined to the ``k/2`` nearest on either side (plus the opposite one
when ``k`` is odd, which needs an even ``n``). It is ``k``-regular and ``k``-connected. Defaults:
``k = min(n - 1, smallest even >= 3 * log2(n))`` (:data:`DEGREE_FACTOR`; ``n <= 12`` gives the
complete graph, 100 clients ``k = 20``, 1000 clients ``k = 30``) and ``t = floor(k / 2) + 1``.

* **Why ``t > k / 2``.** The server may get ``b_u`` from ``t`` neighbours told "``u`` survived"
  and ``s_u`` from ``t`` neighbours told "``u`` dropped"; with both it could strip every mask from
  ``y_u``. An honest client answers only one of the two for each neighbour, so the two groups are
  disjoint, and ``2t > k`` makes two disjoint groups of ``t`` impossible inside one neighbourhood
  of ``k``. Clients refuse a smaller threshold. For the same reason, the server and fewer than
  ``t`` colluding neighbours of ``u`` together learn nothing about ``b_u`` or ``s_u``.
* **Robustness.** The round completes iff every client in ``U3``, and every client in ``U2 - U3``
  with a neighbour in ``U3``, keeps at least ``t`` neighbours up to the unmasking reply: fewer
  than half of a neighbourhood (at most ``k - t = ceil(k / 2) - 1``) may drop. With each client
  dropping independently with probability ``d`` over the round, the union bound
  ``n * P[Binomial(k, d) > k - t]`` on an abort is, for factor 3:

  =======  ===  ===  ==========  ==========  ==========
  n        k    t    d = 0.05    d = 0.10    d = 0.20
  =======  ===  ===  ==========  ==========  ==========
  10       9    5    3e-4        9e-3        0.20
  100      20   11   1e-6        7e-4        0.26
  1000     30   16   2e-9        4e-5        0.23
  10000    40   21   5e-12       2e-6        0.22
  =======  ===  ===  ==========  ==========  ==========

  Factor 2 gives 5e-2 at ``n = 10, d = 0.1``; factor 4 costs a third more mask work for a
  margin the cross-silo federations of this project (tens of clients, complete graphs) do not
  need. Higher ``k`` buys robustness and privacy margin at ``O(k * length)`` PRG work per client.
* **What the server learns.** The sum over each connected component of the graph restricted to
  ``U3``. A ring with ``k / 2`` neighbours on each side stays connected unless two separate runs of
  ``k / 2`` ring-consecutive clients are missing from ``U3``; any component has more than ``t``
  members (each member's self mask needs ``t`` of its neighbours in ``U3``). The number of
  components is reported in :class:`SecAggSummary` (1 = only the total was learned).

Arithmetic and PRG
------------------
Masks and sums live in ``Z / 2**64`` (numpy ``uint64`` wraparound); :class:`Quantizer` maps
floats to int64 stored as uint64 two's complement and guarantees that the true sum of at most
``max_clients`` vectors fits int64, so the modular sum read back as int64 is exact. The PRG is
the ChaCha20 keystream (key: HKDF-SHA256 of the seed with a purpose label) read as little-endian
uint64 (at most ``2**35`` entries: ChaCha20's 32-bit block counter). Shamir sharing is over
``GF(2**521 - 1)`` with the recipient's client id as x-coordinate.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

PRIME = 2**521 - 1
"""The Mersenne prime of the Shamir field (a 32-byte secret and any 64-bit client id fit below it)."""
SHARE_BYTES = 66
"""Bytes of one Shamir share value (``ceil(521 / 8)``), big-endian."""
SECRET_BYTES = 32
"""Bytes of a self-mask seed and of an X25519 private key."""
KEY_BYTES = 32
"""Bytes of a raw X25519 public key."""
NONCE_BYTES = 12
MAX_ID = 2**64 - 1
"""Client ids are ints in ``[1, MAX_ID]`` (they are Shamir x-coordinates, so never 0)."""
DEGREE_FACTOR = 3
"""Default degree: ``min(n - 1, smallest even >= DEGREE_FACTOR * log2(n))`` (module docstring)."""
DEFAULT_SCALE_BITS = 24
"""Default fixed-point precision of :class:`Quantizer`: step ``2**-24``, error <= ``2**-25``."""
STAGES = ("advertise_keys", "share_keys", "masked_input", "unmasking")
"""The four stages, in order; the value of every request's ``"stage"``."""

_LABEL = b"fedrec/secagg+/v1/"
_PURPOSES = ("self-mask", "pairwise-mask")
_SERVER_STEPS = ("advertise_keys", "share_keys", "masked_input", "unmask", "aggregate")
_CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce | two shares | Poly1305 tag
# The PRG may use a fixed nonce: every PRG key is used for exactly one keystream. A self-mask seed
# is fresh per client and round; a pairwise seed is bound by HKDF to (round, both ids) and comes
# from fresh X25519 keys; the purpose label separates the two kinds of key.
_PRG_NONCE = bytes(16)


class SecAggError(ValueError):
    """A protocol violation: a malformed or inconsistent message, a ciphertext that fails
    authentication (tampered or delivered to the wrong client), shares that do not reconstruct."""


class SecAggAborted(RuntimeError):
    """The round cannot complete; nothing is returned.

    Raised by the server when a secret needed to unmask the sum has fewer than ``threshold``
    shares, and by a client that refuses to go on because its own secrets could never be
    reconstructed. ``client_id`` is the client whose secret is missing (``None`` when no masked
    input arrived at all), ``available`` / ``needed`` the share counts, ``stage`` a name in
    :data:`STAGES`.
    """

    def __init__(self, message: str, *, client_id: int | None, available: int, needed: int,
                 stage: str) -> None:
        super().__init__(message)
        self.client_id = client_id
        self.available = available
        self.needed = needed
        self.stage = stage


# ----------------------------------------------------------------------------- validation helpers

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_id(name: str, value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_ID:
        raise ValueError(f"{name} must be an int in [1, 2**64 - 1], got {value!r}")
    return int(value)


def _check_round(value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_ID:
        raise ValueError(f"round_id must be an int in [0, 2**64 - 1], got {value!r}")
    return int(value)


def _field(message: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(message, Mapping):
        raise SecAggError(f"{where}: a message must be a dict, got {type(message).__name__}")
    if key not in message:
        raise SecAggError(f"{where}: field {key!r} is missing (fields: {sorted(message)})")
    return message[key]


def _int_field(message: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(message, key, where)
    if not _is_int(value):
        raise SecAggError(f"{where}: field {key!r} must be an int, got {value!r}")
    return int(value)


def _id_list(message: Mapping[str, Any], key: str, where: str) -> list[int]:
    value = _field(message, key, where)
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and 1 <= v <= MAX_ID for v in value):
        raise SecAggError(f"{where}: field {key!r} must be a list of client ids, got {value!r}")
    ids = [int(v) for v in value]
    if len(set(ids)) != len(ids):
        duplicates = sorted({v for v in ids if ids.count(v) > 1})
        raise SecAggError(f"{where}: field {key!r} lists client(s) {duplicates} more than once")
    return ids


def _bytes_field(message: Mapping[str, Any], key: str, where: str, size: int) -> bytes:
    value = _field(message, key, where)
    if not isinstance(value, bytes) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else repr(type(value).__name__)
        raise SecAggError(f"{where}: field {key!r} must be {size} bytes, got {got}")
    return value


def _bytes_list(message: Mapping[str, Any], key: str, where: str, size: int, count: int) -> list[bytes]:
    value = _field(message, key, where)
    if (not isinstance(value, (list, tuple)) or len(value) != count
            or not all(isinstance(v, bytes) and len(v) == size for v in value)):
        raise SecAggError(f"{where}: field {key!r} must be a list of {count} byte strings of "
                          f"{size} bytes each, got {_describe(value)}")
    return list(value)


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        sizes = [len(v) if isinstance(v, bytes) else type(v).__name__ for v in value[:5]]
        return f"a list of {len(value)} (first sizes {sizes})"
    return repr(type(value).__name__)


def _check_request(request: Mapping[str, Any], *, stage: str, round_id: int, where: str) -> None:
    got_stage = _field(request, "stage", where)
    if got_stage != stage:
        raise SecAggError(f"{where}: expected a {stage!r} request, got stage {got_stage!r}")
    got_round = _field(request, "round", where)
    if got_round != round_id:
        raise SecAggError(f"{where}: request is for round {got_round!r}, this is round {round_id}")


# ------------------------------------------------------------------------------- Shamir sharing

def shamir_share(secret: int, *, xs: Sequence[int], threshold: int) -> list[tuple[int, int]]:
    """Split ``secret`` into ``(x, f(x))`` shares, one per ``x`` in ``xs``; any ``threshold`` recover it.

    ``f`` is a random polynomial of degree ``threshold - 1`` over ``GF(PRIME)`` with ``f(0) = secret``
    (Shamir, CACM 1979); its coefficients are drawn with :func:`secrets.randbelow`. Fewer than
    ``threshold`` shares are independent of the secret.
    """
    if not _is_int(secret) or not 0 <= secret < PRIME:
        raise ValueError(f"secret must be an int in [0, 2**521 - 1), got {secret!r}")
    points = [int(x) for x in xs]
    _check_xs(points)
    if not _is_int(threshold) or not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be an int in [1, {len(points)}] (the number of shares), "
                         f"got {threshold!r}")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_reconstruct(shares: Iterable[tuple[int, int]], *, threshold: int) -> int:
    """The secret ``f(0)`` from at least ``threshold`` shares ``(x, y)``, by Lagrange interpolation.

    ``f(0) = sum_i y_i prod_{j != i} x_j / (x_j - x_i)`` over the ``threshold`` shares with the
    smallest ``x``. Fewer than ``threshold`` shares, a repeated ``x`` or an ``x`` / ``y`` outside the
    field is a ``ValueError``. Shares that do not lie on one polynomial give a wrong value, not an
    error; callers check the result (a 32-byte secret, a private key that matches its public key).
    """
    points = [(int(x), int(y)) for x, y in shares]
    _check_xs([x for x, _ in points])
    for x, y in points:
        if not 0 <= y < PRIME:
            raise ValueError(f"share y-coordinate for x = {x} must be in [0, 2**521 - 1), got {y}")
    if not _is_int(threshold) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares given, threshold {threshold} needed")
    points = sorted(points)[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def _check_xs(xs: Sequence[int]) -> None:
    for x in xs:
        if not _is_int(x) or not 1 <= x < PRIME:
            raise ValueError(f"share x-coordinates must be ints in [1, 2**521 - 1), got {x!r}")
    if len(set(xs)) != len(xs):
        duplicates = sorted({x for x in xs if xs.count(x) > 1})
        raise ValueError(f"duplicate share x-coordinate(s) {duplicates}")


def _secret_bytes(value: int, *, what: str) -> bytes:
    if value >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError(f"the reconstructed {what} does not fit {SECRET_BYTES} bytes: "
                          "the shares are inconsistent")
    return value.to_bytes(SECRET_BYTES, "big")


# ------------------------------------------------------------------- key agreement, AEAD, PRG

def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def _agree(private: X25519PrivateKey, peer_public: bytes, *, purpose: bytes, round_id: int,
           a: int, b: int) -> bytes:
    """A 32-byte key shared by clients ``a`` and ``b``: HKDF-SHA256 of their X25519 secret, bound
    to ``purpose``, the round and the (sorted) pair of ids, so both ends derive the same key."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((a, b))
    return _hkdf(shared, _LABEL + purpose + b"/" + _u64(round_id) + _u64(low) + _u64(high))


def _aad(round_id: int, sender: int, receiver: int) -> bytes:
    return _LABEL + b"share-ciphertext/" + _u64(round_id) + _u64(sender) + _u64(receiver)


def _seal(key: bytes, plaintext: bytes, *, round_id: int, sender: int, receiver: int) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(round_id, sender, receiver))


def _open(key: bytes, blob: bytes, *, round_id: int, sender: int, receiver: int) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                             _aad(round_id, sender, receiver))
    except InvalidTag:
        raise SecAggError(
            f"client {receiver}: the share ciphertext said to be from client {sender} in round "
            f"{round_id} fails authentication (tampered, or routed to the wrong client)") from None


def prg(seed: bytes, length: int, *, purpose: str) -> np.ndarray:
    """``length`` pseudo-random uint64: the ChaCha20 keystream under ``HKDF-SHA256(seed, purpose)``.

    ``purpose`` (``"self-mask"`` or ``"pairwise-mask"``) separates the keys of the two kinds of mask.
    The result is read-only (a view of the keystream bytes, read little-endian).
    """
    if purpose not in _PURPOSES:
        raise ValueError(f"purpose must be one of {_PURPOSES}, got {purpose!r}")
    if not isinstance(seed, bytes) or len(seed) != SECRET_BYTES:
        raise ValueError(f"seed must be {SECRET_BYTES} bytes, got {seed!r:.40}")
    if not _is_int(length) or not 0 <= length <= 2**35:
        raise ValueError(f"length must be an int in [0, 2**35], got {length!r}")
    key = _hkdf(seed, _LABEL + b"prg/" + purpose.encode())
    encryptor = Cipher(algorithms.ChaCha20(key, _PRG_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * int(length)))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def _new_private_key() -> X25519PrivateKey:
    # Any 32 bytes are a valid X25519 private key (clamped on use, RFC 7748 Sect. 5).
    return X25519PrivateKey.from_private_bytes(secrets.token_bytes(SECRET_BYTES))


# -------------------------------------------------------------------------------- quantization

@dataclass(frozen=True)
class Quantizer:
    """Fixed point: ``q = round(value * 2**scale_bits)`` as int64, stored as uint64 two's complement.

    Every value must satisfy ``|value| <= bound`` (clip before quantizing: a value beyond the bound
    or not finite is a ``ValueError``, never clipped here). At construction,
    ``max_clients * ceil(bound * 2**scale_bits) < 2**63``, so the sum of up to ``max_clients``
    quantized vectors fits int64 and the ``mod 2**64`` sum read back as int64 is exact.

    Precision: step ``2**-scale_bits``; round-to-nearest error at most ``2**-(scale_bits + 1)`` per
    coordinate and client (default 24 bits: 3.0e-8; a sum over ``n`` clients is within ``n`` times
    that). With bound 1 (clipped update coordinates) the default allows ``max_clients`` up to
    ``2**39``.

    >>> q = Quantizer(1.0, max_clients=10)
    >>> q.dequantize(q.quantize(np.array([0.5, -0.25])) + q.quantize(np.array([0.25, 0.0])))
    array([ 0.75, -0.25])
    """

    bound: float
    _: KW_ONLY
    max_clients: int
    scale_bits: int = DEFAULT_SCALE_BITS

    def __post_init__(self) -> None:
        if isinstance(self.bound, bool) or not isinstance(self.bound, numbers.Real) \
                or not 0 < self.bound < math.inf:
            raise ValueError(f"bound must be a finite number > 0, got {self.bound!r}")
        object.__setattr__(self, "bound", float(self.bound))
        if not _is_int(self.scale_bits) or not 0 <= self.scale_bits <= 62:
            raise ValueError(f"scale_bits must be an int in [0, 62], got {self.scale_bits!r}")
        if not _is_int(self.max_clients) or self.max_clients < 1:
            raise ValueError(f"max_clients must be an int >= 1, got {self.max_clients!r}")
        largest = math.ceil(math.ldexp(self.bound, self.scale_bits)) if self.bound < 2**62 else 2**63
        if self.max_clients * largest >= 2**63:
            raise ValueError(
                f"max_clients * ceil(bound * 2**scale_bits) must be < 2**63 so that the sum of "
                f"max_clients quantized vectors fits int64, got {self.max_clients} * {largest} "
                f"(bound {self.bound}, scale_bits {self.scale_bits}); lower one of the three")

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """A 1-D float32/float64 array -> uint64 (two's complement of ``round(value * 2**scale_bits)``)."""
        if not isinstance(values, np.ndarray) or not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"values must be a float numpy array, got {_type_of(values)}")
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {values.shape}")
        wide = values.astype(np.float64)
        bad = np.flatnonzero(~(np.abs(wide) <= self.bound))  # NaN compares False: caught here too
        if bad.size:
            i = int(bad[0])
            value, bound = float(values[i]), f"[-{self.bound}, {self.bound}]"
            if not math.isfinite(value):
                raise ValueError(f"values[{i}] = {value} is not finite (quantization bound {bound})")
            raise ValueError(f"values[{i}] = {value!r} is outside the quantization bound {bound} "
                             "(clip before quantizing; nothing is clipped here)")
        return np.rint(np.ldexp(wide, self.scale_bits)).astype(np.int64).view(np.uint64)

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """A (summed) uint64 vector -> float64, reading it as int64 two's complement."""
        if not isinstance(total, np.ndarray) or total.dtype != np.uint64:
            raise ValueError(f"total must be a uint64 numpy array, got {_type_of(total)}")
        return np.ldexp(total.view(np.int64).astype(np.float64), -self.scale_bits)


def _type_of(value: Any) -> str:
    return f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__


# ------------------------------------------------------------------------ communication graph

@dataclass(frozen=True)
class CommunicationGraph:
    """Who shares secrets and masks with whom: symmetric neighbour sets, and the Shamir threshold.

    Every client must have at least ``threshold`` neighbours and fewer than ``2 * threshold``
    (``threshold`` more than half of its neighbourhood: see the module docstring).
    """

    neighbours: Mapping[int, frozenset[int]]
    threshold: int

    def __post_init__(self) -> None:
        if not isinstance(self.neighbours, Mapping):
            raise ValueError(f"neighbours must be a mapping, got {type(self.neighbours).__name__}")
        graph = {_check_id("client id", u): frozenset(_check_id(f"neighbour of {u}", v) for v in vs)
                 for u, vs in self.neighbours.items()}
        if len(graph) < 2:
            raise ValueError(f"a communication graph needs at least 2 clients, got {sorted(graph)}")
        for u, vs in graph.items():
            if u in vs:
                raise ValueError(f"client {u} is listed as its own neighbour")
            for v in vs:
                if u not in graph.get(v, ()):
                    raise ValueError(f"the graph must be symmetric: {v} is a neighbour of {u} "
                                     f"but {u} is not a neighbour of {v}")
        t = self.threshold
        for u, vs in graph.items():
            if not _is_int(t) or not len(vs) // 2 + 1 <= t <= len(vs):
                raise ValueError(f"threshold must be an int in [{len(vs) // 2 + 1}, {len(vs)}] for "
                                 f"client {u} with {len(vs)} neighbours (more than half of them), "
                                 f"got {t!r}")
        object.__setattr__(self, "neighbours", dict(sorted(graph.items())))
        object.__setattr__(self, "threshold", int(t))

    @property
    def clients(self) -> tuple[int, ...]:
        """All client ids, sorted."""
        return tuple(self.neighbours)

    @property
    def degree(self) -> int:
        """The largest neighbourhood (every client's, for a :func:`choose_graph` graph)."""
        return max(len(vs) for vs in self.neighbours.values())


def default_degree(num_clients: int) -> int:
    """``min(n - 1, smallest even >= DEGREE_FACTOR * log2(n))`` (module docstring for the choice)."""
    if not _is_int(num_clients) or num_clients < 2:
        raise ValueError(f"num_clients must be an int >= 2, got {num_clients!r}")
    return min(num_clients - 1, 2 * math.ceil(DEGREE_FACTOR * math.log2(num_clients) / 2))


def choose_graph(client_ids: Iterable[int], *, degree: int | None = None,
                 threshold: int | None = None, rng: random.Random | None = None) -> CommunicationGraph:
    """A ``degree``-regular Harary graph over a random ordering of ``client_ids``.

    Parameters
    ----------
    client_ids
        At least 2 distinct ids in ``[1, 2**64 - 1]``.
    degree
        ``k``; default :func:`default_degree`. Must be in ``[1, n - 1]``, and even when ``n`` is odd
        (no ``k``-regular graph has odd ``n * k``). ``k = n - 1`` is the complete graph.
    threshold
        ``t``; default ``k // 2 + 1``. Must be in ``[k // 2 + 1, k]``.
    rng
        Source of the ordering; default :class:`secrets.SystemRandom` (OS randomness). Pass a
        seeded ``random.Random`` only in tests.
    """
    ids = [_check_id("client id", u) for u in client_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"client_ids must be distinct, got {sorted({u for u in ids if ids.count(u) > 1})} "
                         "more than once")
    n = len(ids)
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    k = default_degree(n) if degree is None else degree
    if not _is_int(k) or not 1 <= k <= n - 1:
        raise ValueError(f"degree must be an int in [1, {n - 1}] (at most n - 1 for {n} clients), "
                         f"got {degree!r}")
    if n * k % 2:
        raise ValueError(f"degree must be even when the number of clients is odd (no {k}-regular "
                         f"graph on {n} clients), got {k}")
    t = k // 2 + 1 if threshold is None else threshold
    if not _is_int(t) or not k // 2 + 1 <= t <= k:
        raise ValueError(f"threshold must be an int in [{k // 2 + 1}, {k}] (more than half of "
                         f"degree {k}, at most the degree), got {threshold!r}")
    order = sorted(ids)
    (rng or secrets.SystemRandom()).shuffle(order)
    offsets = list(range(1, k // 2 + 1)) + [-j for j in range(1, k // 2 + 1)]
    if k % 2:
        offsets.append(n // 2)
    neighbours = {u: frozenset(order[(i + j) % n] for j in offsets) for i, u in enumerate(order)}
    return CommunicationGraph(neighbours=neighbours, threshold=int(t))


# ------------------------------------------------------------------------------------- client

class SecAggClient:
    """One client's side of one round; call the four stages in order, each at most once.

    >>> client = SecAggClient(3, round_id=7)
    >>> sorted(client.advertise_keys({"stage": "advertise_keys", "round": 7}))
    ['c_pk', 's_pk']

    The client keeps its private keys and self-mask seed only until its masked input is sent,
    and answers at most one unmasking request, so a second request cannot obtain the other kind
    of share.
    """

    def __init__(self, client_id: int, round_id: int) -> None:
        self.client_id = _check_id("client_id", client_id)
        self.round_id = _check_round(round_id)
        self._next = 0  # index in STAGES of the next stage to run
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._seed: bytes | None = None
        self._threshold = 0
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # alive neighbour -> (c_pk, s_pk)
        self._held: dict[int, tuple[int, int]] = {}  # neighbour -> (share of b_v, share of s_v)

    def to_state(self) -> dict[str, Any]:
        """Everything this client holds mid-round, as a flat dict of ints, bytes and lists of one.

        For a client that is a fresh process at every stage (Flower keeps ``Context.state`` per node
        between messages, not Python objects): :meth:`from_state` restores an equal client. The
        state holds the client's **private keys and self-mask seed** until its masked input is sent
        (and the neighbours' shares until it answers the unmasking request): keep it where the
        client keeps its own secrets, never send it anywhere. Ids and the round are Python ints
        (up to ``2**64 - 1``; an adapter that stores them as signed 64-bit ints must number its
        clients below ``2**63``).
        """
        def raw(key: X25519PrivateKey | None) -> bytes:
            return b"" if key is None else key.private_bytes_raw()

        held = sorted(self._held)
        return {
            "client_id": self.client_id, "round_id": self.round_id, "next": self._next,
            "c_key": raw(self._c_key), "s_key": raw(self._s_key), "seed": self._seed or b"",
            "threshold": self._threshold,
            "peer_ids": sorted(self._peers),
            "peer_c_pks": [self._peers[v][0] for v in sorted(self._peers)],
            "peer_s_pks": [self._peers[v][1] for v in sorted(self._peers)],
            "held_ids": held,
            "held_seed_shares": [self._held[v][0].to_bytes(SHARE_BYTES, "big") for v in held],
            "held_key_shares": [self._held[v][1].to_bytes(SHARE_BYTES, "big") for v in held],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """The client :meth:`to_state` described; a malformed state is a :class:`SecAggError`."""
        where = "secure aggregation client state"
        client = cls(_int_field(state, "client_id", where), _int_field(state, "round_id", where))
        stage = _int_field(state, "next", where)
        if not 0 <= stage <= len(STAGES):
            raise SecAggError(f"{where}: field 'next' must be in [0, {len(STAGES)}], got {stage}")

        def secret(key: str) -> bytes | None:
            value = _field(state, key, where)
            if value == b"":
                return None
            return _bytes_field(state, key, where, SECRET_BYTES)

        c_key, s_key, seed = secret("c_key"), secret("s_key"), secret("seed")
        # what each stage still needs: keys after advertise_keys, and the seed after share_keys,
        # until the masked input is sent
        needs = {"c_key": 1 <= stage <= 2, "s_key": 1 <= stage <= 2, "seed": stage == 2}
        for key, value in (("c_key", c_key), ("s_key", s_key), ("seed", seed)):
            if needs[key] and value is None:
                raise SecAggError(f"{where}: field {key!r} is empty, but the client's next stage "
                                  f"({STAGES[stage]}) needs it")
        peers = _id_list(state, "peer_ids", where)
        c_pks = _bytes_list(state, "peer_c_pks", where, KEY_BYTES, len(peers))
        s_pks = _bytes_list(state, "peer_s_pks", where, KEY_BYTES, len(peers))
        held = _id_list(state, "held_ids", where)
        seed_shares = _bytes_list(state, "held_seed_shares", where, SHARE_BYTES, len(held))
        key_shares = _bytes_list(state, "held_key_shares", where, SHARE_BYTES, len(held))
        client._next = stage
        client._c_key = None if c_key is None else X25519PrivateKey.from_private_bytes(c_key)
        client._s_key = None if s_key is None else X25519PrivateKey.from_private_bytes(s_key)
        client._seed = seed
        client._threshold = _int_field(state, "threshold", where)
        client._peers = {v: (c, s) for v, c, s in zip(peers, c_pks, s_pks)}
        client._held = {v: (int.from_bytes(b, "big"), int.from_bytes(s, "big"))
                        for v, b, s in zip(held, seed_shares, key_shares)}
        return client

    def _begin(self, request: Mapping[str, Any], stage: str) -> str:
        where = f"client {self.client_id}, {stage}"
        expected = STAGES[self._next] if self._next < len(STAGES) else "nothing (round over)"
        if stage != expected:
            raise SecAggError(f"{where}: out of order, the next stage of this client is {expected}")
        _check_request(request, stage=stage, round_id=self.round_id, where=where)
        return where

    def advertise_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 0: fresh X25519 key pairs; reply with both raw public keys."""
        self._begin(request, "advertise_keys")
        self._c_key, self._s_key = _new_private_key(), _new_private_key()
        self._next = 1
        return {"c_pk": self._c_key.public_key().public_bytes_raw(),
                "s_pk": self._s_key.public_key().public_bytes_raw()}

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 1: Shamir-share ``b_u`` and ``s_u`` among the alive neighbours, encrypted to each."""
        where = self._begin(request, "share_keys")
        t = _int_field(request, "threshold", where)
        neighbours = _id_list(request, "neighbours", where)
        alive = _id_list(request, "alive", where)
        c_pks = _bytes_list(request, "c_pks", where, KEY_BYTES, len(alive))
        s_pks = _bytes_list(request, "s_pks", where, KEY_BYTES, len(alive))
        if self.client_id in neighbours:
            raise SecAggError(f"{where}: the client is listed as its own neighbour")
        if not set(alive) <= set(neighbours):
            raise SecAggError(f"{where}: alive client(s) {sorted(set(alive) - set(neighbours))} "
                              f"are not neighbours {sorted(neighbours)}")
        if not 2 * t > len(neighbours):
            raise SecAggError(f"{where}: threshold {t} is not more than half of {len(neighbours)} "
                              "neighbours; the client refuses (the server could get both shares)")
        if len(alive) < t:
            raise SecAggAborted(
                f"{where}: only {len(alive)} of client {self.client_id}'s {len(neighbours)} "
                f"neighbours are alive, threshold {t} needed; its secrets could not be reconstructed",
                client_id=self.client_id, available=len(alive), needed=t, stage="share_keys")
        seed = secrets.token_bytes(SECRET_BYTES)
        seed_shares = shamir_share(int.from_bytes(seed, "big"), xs=alive, threshold=t)
        key_shares = shamir_share(int.from_bytes(self._s_key.private_bytes_raw(), "big"),
                                  xs=alive, threshold=t)
        ciphertexts = []
        for (v, b_share), (_, s_share), c_pk in zip(seed_shares, key_shares, c_pks):
            key = _agree(self._c_key, c_pk, purpose=b"share-encryption", round_id=self.round_id,
                         a=self.client_id, b=v)
            plaintext = b_share.to_bytes(SHARE_BYTES, "big") + s_share.to_bytes(SHARE_BYTES, "big")
            ciphertexts.append(_seal(key, plaintext, round_id=self.round_id,
                                     sender=self.client_id, receiver=v))
        self._seed, self._threshold = seed, t
        self._peers = {v: (c, s) for v, c, s in zip(alive, c_pks, s_pks)}
        self._next = 2
        return {"receivers": alive, "ciphertexts": ciphertexts}

    def masked_input(self, request: Mapping[str, Any], vector: np.ndarray) -> dict[str, Any]:
        """Stage 2: keep the neighbours' shares; reply ``vector + masks (mod 2**64)`` as bytes.

        ``vector`` is the 1-D uint64 output of :meth:`Quantizer.quantize`.
        """
        where = self._begin(request, "masked_input")
        length = _int_field(request, "length", where)
        senders = _id_list(request, "senders", where)
        ciphertexts = _bytes_list(request, "ciphertexts", where, _CIPHERTEXT_BYTES, len(senders))
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.ndim != 1:
            raise ValueError(f"vector must be a 1-D uint64 numpy array (Quantizer.quantize), got "
                             f"{_type_of(vector)}{getattr(vector, 'shape', '')}")
        if vector.shape[0] != length:
            raise ValueError(f"vector must have the round's length {length}, got {vector.shape[0]}")
        unknown = sorted(set(senders) - set(self._peers))
        if unknown:
            raise SecAggError(f"{where}: ciphertexts from client(s) {unknown}, which are not among "
                              f"its alive neighbours {sorted(self._peers)}")
        held, refused = {}, []
        for v, blob in zip(senders, ciphertexts):
            key = _agree(self._c_key, self._peers[v][0], purpose=b"share-encryption",
                         round_id=self.round_id, a=self.client_id, b=v)
            try:
                plaintext = _open(key, blob, round_id=self.round_id, sender=v, receiver=self.client_id)
                b_share = int.from_bytes(plaintext[:SHARE_BYTES], "big")
                s_share = int.from_bytes(plaintext[SHARE_BYTES:], "big")
                if not (b_share < PRIME and s_share < PRIME):
                    raise SecAggError(f"{where}: the shares from client {v} are outside the field")
            except SecAggError as err:  # refused: no mask with v, none of its shares; the server is told
                logger.warning("%s; client %s masks without client %s", err, self.client_id, v)
                refused.append(v)
                continue
            held[v] = (b_share, s_share)
        if len(held) < self._threshold:
            why = f" ({len(refused)} refused)" if refused else ""
            raise SecAggAborted(
                f"{where}: only {len(held)} of client {self.client_id}'s neighbours shared keys{why}, "
                f"threshold {self._threshold} needed; its secrets could not be reconstructed",
                client_id=self.client_id, available=len(held), needed=self._threshold,
                stage="masked_input")
        masked = vector.copy()  # (L,) uint64; += and -= wrap mod 2**64
        masked += prg(self._seed, length, purpose="self-mask")
        for v in held:
            s_uv = _agree(self._s_key, self._peers[v][1], purpose=b"pairwise-mask",
                          round_id=self.round_id, a=self.client_id, b=v)
            if self.client_id < v:
                masked += prg(s_uv, length, purpose="pairwise-mask")
            else:
                masked -= prg(s_uv, length, purpose="pairwise-mask")
        self._held = held
        self._c_key = self._s_key = self._seed = None  # not needed any more: nothing left to leak
        self._next = 3
        reply: dict[str, Any] = {"masked": masked.astype("<u8", copy=False).tobytes()}
        if refused:
            reply["refused"] = refused
        return reply

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 3: shares of ``b_v`` for surviving and of ``s_v`` for dropped neighbours.

        Refuses (:class:`SecAggError`) unless ``survivors`` and ``dropped`` are disjoint, exclude
        this client, and together are exactly the neighbours whose shares it received (those it
        masked with). Aborts (:class:`SecAggAborted`) when fewer than ``threshold`` neighbours
        survived: its own self mask could then never be removed.
        """
        where = self._begin(request, "unmasking")
        survivors = _id_list(request, "survivors", where)
        dropped = _id_list(request, "dropped", where)
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise SecAggError(f"{where}: client(s) {both} are listed both as survivors and as "
                              "dropped; the client refuses to reveal both shares of one client")
        if self.client_id in survivors or self.client_id in dropped:
            raise SecAggError(f"{where}: the request lists the client itself")
        unknown = sorted(set(survivors + dropped) - set(self._held))
        if unknown:
            raise SecAggError(f"{where}: client(s) {unknown} did not share keys with this client "
                              f"(it holds shares of {sorted(self._held)})")
        missing = sorted(set(self._held) - set(survivors + dropped))
        if missing:
            raise SecAggError(f"{where}: the request omits neighbour(s) {missing} that this client "
                              "masked with")
        if len(survivors) < self._threshold:
            raise SecAggAborted(
                f"{where}: only {len(survivors)} of client {self.client_id}'s neighbours survived, "
                f"threshold {self._threshold} needed to remove its own self mask",
                client_id=self.client_id, available=len(survivors), needed=self._threshold,
                stage="unmasking")
        reply = {
            "seed_owners": survivors,
            "seed_shares": [self._held[v][0].to_bytes(SHARE_BYTES, "big") for v in survivors],
            "key_owners": dropped,
            "key_shares": [self._held[v][1].to_bytes(SHARE_BYTES, "big") for v in dropped],
        }
        self._held = {}
        self._next = 4
        return reply


# ------------------------------------------------------------------------------------- server

@dataclass(frozen=True)
class SecAggSummary:
    """What happened in one round (for the run's metrics and the privacy audit).

    ``survivors``: clients whose masked input is in the sum (``U3``). ``dropped``: per stage name,
    the clients that did not answer it. ``seeds_reconstructed`` / ``keys_reconstructed``: whose
    self-mask seed / mask private key the server rebuilt. ``components``: connected components
    of the graph restricted to the survivors (the server learns each one's sum; 1 = only the
    total).
    """

    round_id: int
    clients: tuple[int, ...]
    degree: int
    threshold: int
    survivors: tuple[int, ...]
    dropped: Mapping[str, tuple[int, ...]]
    seeds_reconstructed: tuple[int, ...]
    keys_reconstructed: tuple[int, ...]
    components: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dropped"] = {stage: list(ids) for stage, ids in self.dropped.items()}
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}


class SecAggServer:
    """The server's side of one round.

    Each method takes the replies of the previous stage (``{client_id: reply}``; a client absent
    from the dict dropped) and returns the requests of its stage (``{client_id: request}``)::

        requests = server.advertise_keys()
        replies = {u: clients[u].advertise_keys(r) for u, r in requests.items()}  # minus dropouts
        requests = server.share_keys(replies)      # ... clients[u].share_keys(r)
        requests = server.masked_input(replies)    # ... clients[u].masked_input(r, vectors[u])
        requests = server.unmask(replies)          # ... clients[u].unmask(r)
        total, summary = server.aggregate(replies)

    A reply that is malformed or does not match what its client was sent (a key of the wrong size
    or a low-order point, receivers other than the alive neighbours it was given, a masked vector of
    the wrong length, shares for other owners than it was asked about or outside the field) is
    **rejected**: that client counts as dropped at that stage, exactly as if it had not answered,
    and the reason is kept in :attr:`rejected`. The round then goes on through the ordinary dropout
    recovery and aborts (:class:`SecAggAborted`) only when too few shares remain. A method that
    raises leaves the server as it was (except :attr:`rejected`, which keeps the replies it
    refused). Replies from clients that were not asked, or not passed as a dict, are
    :class:`SecAggError` (a caller's mistake, not a client's).
    """

    def __init__(self, graph: CommunicationGraph, *, round_id: int, vector_length: int) -> None:
        if not isinstance(graph, CommunicationGraph):
            raise ValueError(f"graph must be a CommunicationGraph, got {type(graph).__name__}")
        if not _is_int(vector_length) or not 1 <= vector_length <= 2**35:
            raise ValueError(f"vector_length must be an int in [1, 2**35], got {vector_length!r}")
        self.graph = graph
        self.round_id = _check_round(round_id)
        self.vector_length = int(vector_length)
        self._next = 0
        self._answered: list[frozenset[int]] = []  # U1, U2, U3, U4
        self._requests: dict[int, dict[str, Any]] = {}  # last requests sent, by client
        self._public: dict[int, tuple[bytes, bytes]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._masked_with: dict[int, frozenset[int]] = {}  # M(u) of every u in U3
        self._result: tuple[np.ndarray, SecAggSummary] | None = None
        self._rejected: dict[str, dict[int, str]] = {}

    @property
    def rejected(self) -> dict[str, dict[int, str]]:
        """The replies refused so far, by stage name: ``{client_id: reason}`` (each such client
        counts as dropped at that stage)."""
        return {stage: dict(reasons) for stage, reasons in self._rejected.items()}

    def _accept(self, replies: Mapping[int, Mapping[str, Any]], stage: str,
                parse: Callable[[int, Mapping[str, Any], str], Any]) -> dict[int, Any]:
        """``parse(client_id, reply, where)`` for every reply; one that raises :class:`SecAggError`
        is rejected (recorded in :attr:`rejected`, left out of the result)."""
        accepted: dict[int, Any] = {}
        rejected: dict[int, str] = {}
        for u, reply in self._replies(replies, stage).items():
            try:
                accepted[u] = parse(u, reply, f"round {self.round_id}, {stage} reply of client {u}")
            except SecAggError as err:
                rejected[u] = str(err)
                logger.info("%s: client %s counts as dropped at %s", err, u, stage)
        self._rejected[stage] = rejected
        return accepted

    def _begin(self, step: str) -> None:
        if self._next >= len(_SERVER_STEPS) or _SERVER_STEPS[self._next] != step:
            expected = _SERVER_STEPS[self._next] if self._next < len(_SERVER_STEPS) else "nothing"
            raise RuntimeError(f"round {self.round_id}: {step}() called out of order, the server's "
                               f"next step is {expected}()")

    def _replies(self, replies: Mapping[int, Mapping[str, Any]], stage: str) -> dict[int, Mapping]:
        if not isinstance(replies, Mapping):
            raise SecAggError(f"{stage} replies must be a dict client_id -> reply, got "
                              f"{type(replies).__name__}")
        stray = sorted(set(replies) - set(self._requests))
        if stray:
            raise SecAggError(f"round {self.round_id}, {stage}: replies from client(s) {stray}, "
                              "which were not asked")
        return dict(sorted(replies.items()))

    def _request(self, stage: str, **fields: Any) -> dict[str, Any]:
        return {"stage": stage, "round": self.round_id, **fields}

    def advertise_keys(self) -> dict[int, dict[str, Any]]:
        """Stage 0 requests, one per client."""
        self._begin("advertise_keys")
        self._requests = {u: self._request("advertise_keys") for u in self.graph.clients}
        self._next = 1
        return dict(self._requests)

    def share_keys(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 0 replies -> stage 1 requests: each client gets its alive neighbours' keys."""
        self._begin("share_keys")
        probe = X25519PrivateKey.generate()

        def parse(u: int, reply: Mapping[str, Any], where: str) -> tuple[bytes, bytes]:
            keys = (_bytes_field(reply, "c_pk", where, KEY_BYTES), _bytes_field(reply, "s_pk", where, KEY_BYTES))
            for name, key in zip(("c_pk", "s_pk"), keys):
                try:  # a low-order point would make every neighbour's key agreement fail
                    probe.exchange(X25519PublicKey.from_public_bytes(key))
                except ValueError as err:
                    raise SecAggError(f"{where}: field {name!r} is not a usable X25519 public key "
                                      f"({err})") from None
            return keys

        public = self._accept(replies, "advertise_keys", parse)
        requests = {}
        for u in public:
            alive = sorted(self.graph.neighbours[u] & public.keys())
            requests[u] = self._request(
                "share_keys", threshold=self.graph.threshold,
                neighbours=sorted(self.graph.neighbours[u]), alive=alive,
                c_pks=[public[v][0] for v in alive], s_pks=[public[v][1] for v in alive])
        self._public, self._requests = public, requests
        self._answered.append(frozenset(public))
        self._next = 2
        return dict(requests)

    def masked_input(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 1 replies -> stage 2 requests: route each ciphertext to its receiver."""
        self._begin("masked_input")

        def parse(u: int, reply: Mapping[str, Any], where: str) -> dict[int, bytes]:
            receivers = _id_list(reply, "receivers", where)
            if sorted(receivers) != self._requests[u]["alive"]:
                raise SecAggError(f"{where}: receivers {sorted(receivers)} differ from the alive "
                                  f"neighbours it was sent {self._requests[u]['alive']}")
            blobs = _bytes_list(reply, "ciphertexts", where, _CIPHERTEXT_BYTES, len(receivers))
            return dict(zip(receivers, blobs))

        # sender -> receiver -> ciphertext; a rejected sender's ciphertexts are delivered to nobody
        outgoing: dict[int, dict[int, bytes]] = self._accept(replies, "share_keys", parse)
        requests = {}
        for w in outgoing:
            senders = sorted(v for v in outgoing if w in outgoing[v])
            requests[w] = self._request("masked_input", length=self.vector_length, senders=senders,
                                        ciphertexts=[outgoing[v][w] for v in senders])
        self._requests = requests
        self._answered.append(frozenset(outgoing))
        self._next = 3
        return dict(requests)

    def unmask(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 2 replies -> stage 3 requests: each survivor learns which neighbours survived."""
        self._begin("unmask")

        def parse(u: int, reply: Mapping[str, Any], where: str) -> tuple[np.ndarray, list[int]]:
            blob = _bytes_field(reply, "masked", where, 8 * self.vector_length)
            refused = _id_list(reply, "refused", where) if "refused" in reply else []
            stray = sorted(set(refused) - set(self._requests[u]["senders"]))
            if stray:
                raise SecAggError(f"{where}: it refused client(s) {stray}, which sent it no ciphertext")
            return np.frombuffer(blob, dtype="<u8").astype(np.uint64, copy=False), refused

        parsed = self._accept(replies, "masked_input", parse)
        accused: dict[int, list[int]] = {}  # sender -> the clients that refused its ciphertexts
        for u, (_, refused) in parsed.items():
            for v in refused:
                accused.setdefault(v, []).append(u)
        for v, by in sorted(accused.items()):
            if v in parsed:
                self._rejected["masked_input"][v] = (
                    f"round {self.round_id}, masked_input: client(s) {sorted(by)} refused the share "
                    f"ciphertext(s) of client {v} (authentication failed or shares outside the field); "
                    "its masked input is left out")
                logger.info("%s: client %s counts as dropped at masked_input", self._rejected["masked_input"][v], v)
        masked = {u: vector for u, (vector, _) in parsed.items() if u not in accused}
        # M(u): the senders u masked with (all but those it refused)
        masked_with = {u: frozenset(self._requests[u]["senders"]) - set(parsed[u][1]) for u in masked}
        requests = {}
        for u in masked:
            near = masked_with[u]
            requests[u] = self._request("unmasking", survivors=sorted(near & masked.keys()),
                                        dropped=sorted(near - masked.keys()))
        self._masked, self._masked_with, self._requests = masked, masked_with, requests
        self._answered.append(frozenset(masked))
        self._next = 4
        return dict(requests)

    def aggregate(self, replies: Mapping[int, Mapping[str, Any]]) -> tuple[np.ndarray, SecAggSummary]:
        """Stage 3 replies -> the exact sum of the survivors' vectors (uint64) and a summary.

        Raises :class:`SecAggAborted` when any needed secret has fewer than ``threshold`` shares.
        """
        self._begin("aggregate")
        t = self.graph.threshold

        def parse(u: int, reply: Mapping[str, Any], where: str) -> list[list[tuple[int, int]]]:
            request, parsed = self._requests[u], []
            for owners_key, shares_key, asked in (("seed_owners", "seed_shares", request["survivors"]),
                                                  ("key_owners", "key_shares", request["dropped"])):
                owners = _id_list(reply, owners_key, where)
                if sorted(owners) != asked:
                    raise SecAggError(f"{where}: {owners_key} {sorted(owners)} differ from the "
                                      f"request {asked}")
                shares = [(v, int.from_bytes(blob, "big")) for v, blob in
                          zip(owners, _bytes_list(reply, shares_key, where, SHARE_BYTES, len(owners)))]
                for v, y in shares:
                    if y >= PRIME:
                        raise SecAggError(f"{where}: the share for client {v} is outside the field")
                parsed.append(shares)
            return parsed

        accepted = self._accept(replies, "unmasking", parse)  # a rejected client's shares are not used
        seed_shares: dict[int, list[tuple[int, int]]] = {}
        key_shares: dict[int, list[tuple[int, int]]] = {}
        for u, (seeds, keys) in accepted.items():
            for into, shares in ((seed_shares, seeds), (key_shares, keys)):
                for v, y in shares:
                    into.setdefault(v, []).append((u, y))
        survivors = sorted(self._masked)
        shared = self._answered[1]
        needed_keys = sorted(v for v in shared - self._masked.keys()
                             if any(v in self._masked_with[u] for u in self._masked))
        if not survivors:
            raise SecAggAborted(f"round {self.round_id}: no masked input was received",
                                client_id=None, available=0, needed=1, stage="masked_input")
        short = [(v, "self-mask seed", len(seed_shares.get(v, ()))) for v in survivors] + \
                [(v, "mask private key", len(key_shares.get(v, ()))) for v in needed_keys]
        short = [entry for entry in short if entry[2] < t]
        if short:
            v, what, available = short[0]
            more = f" (and {len(short) - 1} more secret(s) below threshold)" if len(short) > 1 else ""
            raise SecAggAborted(
                f"round {self.round_id}: cannot reconstruct the {what} of client {v}: {available} "
                f"share(s) available, {t} needed{more}",
                client_id=v, available=available, needed=t, stage="unmasking")

        total = np.zeros(self.vector_length, dtype=np.uint64)  # (L,) mod 2**64
        for v in survivors:
            seed = _secret_bytes(shamir_reconstruct(seed_shares[v], threshold=t),
                                 what=f"self-mask seed of client {v}")
            total += self._masked[v]
            total -= prg(seed, self.vector_length, purpose="self-mask")
        for v in needed_keys:
            raw = _secret_bytes(shamir_reconstruct(key_shares[v], threshold=t),
                                what=f"mask private key of client {v}")
            private = X25519PrivateKey.from_private_bytes(raw)
            if private.public_key().public_bytes_raw() != self._public[v][1]:
                raise SecAggError(f"round {self.round_id}: the reconstructed mask private key of "
                                  f"client {v} does not match its public key: inconsistent shares")
            for u in sorted(u for u in self._masked if v in self._masked_with[u]):
                s_uv = _agree(private, self._public[u][1], purpose=b"pairwise-mask",
                              round_id=self.round_id, a=u, b=v)
                if u < v:  # u added +PRG(s_uv): take it away
                    total -= prg(s_uv, self.vector_length, purpose="pairwise-mask")
                else:
                    total += prg(s_uv, self.vector_length, purpose="pairwise-mask")

        answered = [frozenset(self.graph.clients)] + self._answered + [frozenset(accepted)]
        summary = SecAggSummary(
            round_id=self.round_id, clients=self.graph.clients, degree=self.graph.degree,
            threshold=t, survivors=tuple(survivors),
            dropped={stage: tuple(sorted(answered[i] - answered[i + 1]))
                     for i, stage in enumerate(STAGES)},
            seeds_reconstructed=tuple(survivors), keys_reconstructed=tuple(needed_keys),
            components=_components(self.graph, set(survivors)))
        if summary.components > 1:
            logger.warning("round %s: the survivors form %s components of the communication "
                           "graph; their partial sums are visible to the server",
                           self.round_id, summary.components)
        logger.info("round %s: aggregated %s of %s clients (dropped per stage %s)", self.round_id,
                    len(survivors), len(self.graph.clients),
                    {stage: len(ids) for stage, ids in summary.dropped.items()})
        self._answered.append(frozenset(accepted))
        self._result = (total, summary)
        self._next = 5
        return total, summary

    def result(self) -> tuple[np.ndarray, SecAggSummary]:
        """The ``(total, summary)`` of :meth:`aggregate` (``RuntimeError`` before it succeeded)."""
        if self._result is None:
            raise RuntimeError(f"round {self.round_id}: no result, aggregate() has not succeeded")
        return self._result


def _components(graph: CommunicationGraph, members: set[int]) -> int:
    """Connected components of ``graph`` restricted to ``members``."""
    seen: set[int] = set()
    count = 0
    for start in sorted(members):
        if start in seen:
            continue
        count += 1
        stack = [start]
        seen.add(start)
        while stack:
            for v in graph.neighbours[stack.pop()] & members:
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
    return count
