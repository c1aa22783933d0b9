"""Typed experiment configuration, built in one place from a TOML file and ``key=value`` overrides.

Sections and their defaults (every key is optional; unknown keys are an error)::

    [data]    kind = "synthetic"  path = ""  (+ column names for kind = "interactions", min_length)
    [data.synthetic]  the fields of core_model.synthetic.SyntheticConfig
    [model]   the fields of core_model.model.ModelConfig except num_items and num_item_features
              (taken from the data and its catalogue)
    [train]   the fields of core_model.train.TrainConfig
    [eval]    exclude_history = true  sampled = true  seed = 0
    [federation]  rounds, strategy, partition, local training (see FederationConfig)
    [privacy] mode = "none" | "dp-sgd", noise or target epsilon, clipping (see PrivacyConfig)

Overrides use dotted keys with TOML values: ``train.lr=2e-3``, ``data.kind="ml-1m"`` (strings may
be given without quotes: ``data.kind=ml-1m``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core_model.model import ModelConfig
from core_model.train import TrainConfig
from core_model.validation import check_fields

DATA_KINDS = ("synthetic", "interactions", "sasrec", "ml-1m", "ml-100k", "twitch")
STRATEGIES = ("fedavg", "fedadam", "fedprox")
PRIVACY_MODES = ("none", "dp-sgd")
NOISE_PLACEMENTS = ("local", "distributed")
PARTITIONS = ("attribute", "group", "iid", "dirichlet-size", "dirichlet-label")
SECURE_AGGREGATION = ("auto", "on", "off")
SECAGG_DEFAULT_BOUND = float(2**24)
"""Default ``privacy.secagg_bound``: 16,777,216 (room for n_k up to 16.7M users, and n_k * |change|)."""
SECAGG_DEFAULT_SCALE_BITS = 24
"""Default ``privacy.secagg_scale_bits``: ``privacy.secagg.DEFAULT_SCALE_BITS`` (core_model does not
import privacy; a test checks that the two agree)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the interaction log comes from.

    ``kind="synthetic"`` generates the built-in SYNTHETIC live-commerce log (no file needed);
    every other kind reads ``path``: a file (``interactions``, ``sasrec``, ``twitch``) or a folder
    (``ml-1m``, ``ml-100k``). Column names apply to ``kind="interactions"`` (empty = absent).
    ``catalogue``: a deployment's public item catalogue (a text file, one raw item id per line,
    line k = item index k); when set, the ServerApp takes the items from it instead of reading the
    log, and every node indexes its own log by it (``client/node.py``, docs/deployment.md).
    """

    kind: str = "synthetic"
    path: str = ""
    user_col: str = "user"
    item_col: str = "item"
    timestamp_col: str = ""
    event_col: str = ""
    group_col: str = ""
    min_length: int = 3
    catalogue: str = ""
    synthetic: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.kind={self.kind!r} (a file or folder)")
        if self.min_length < 3:
            raise ValueError(f"data.min_length must be >= 3 for leave-one-out, got {self.min_length}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (see core_model.evaluate)."""

    exclude_history: bool = True
    sampled: bool = True
    seed: int = 0


@dataclass(frozen=True)
class FederationConfig:
    """Federated training (``fedrec simulate``, the Flower ServerApp / ClientApp).

    Each round the server samples ``fraction_train`` of the clients (at least
    ``min_train_clients``), each trains ``local_epochs`` passes over its own users with the
    ``[train]`` optimiser settings (``train.batch_size``; learning rate below), and the
    server aggregates the returned weights weighted by the clients' numbers of users. The clients'
    learning rate is set by the server each round: ``train.lr`` throughout
    (``lr_schedule="constant"``) or decayed over the rounds with a cosine from ``train.lr`` in
    round 1 to 10 % of it in the last round (``"cosine"``, the centralized schedule's shape), sent
    as ``lr`` in the round's config.

    * ``fedavg``: the weighted mean (McMahan et al., AISTATS 2017);
    * ``fedprox``: the same, clients add ``proximal_mu / 2 * ||w - w_global||^2`` (Li et al., MLSys 2020);
    * ``fedadam``: the weighted mean delta is a pseudo-gradient for a server Adam with ``server_lr``,
      ``server_beta1``, ``server_beta2``, ``server_tau`` (Reddi et al., ICLR 2021). Adam's step does
      not scale with the pseudo-gradient, so the clients' ``lr_schedule`` barely moves it; the
      server's own learning rate follows ``server_lr_schedule``: ``"constant"`` or ``"cosine"``
      (from ``server_lr`` in round 1 to ``server_lr_final`` times it in the last round; default 0.1).

    ``server_ema`` (0: off): the server also keeps an exponential moving average of the global
    weights over the rounds, ``a_t = server_ema * a_(t-1) + (1 - server_ema) * w_t``, divided by
    ``1 - server_ema ** t`` so that it is a weighted mean of the rounds' models and not pulled
    towards zero (Adam's bias correction). The clients always train from the last iterate
    ``w_t``; the average is what the server serves and evaluates (``model.pt``; the last iterate
    is then ``model-last.pt``). It only post-processes models the server already holds, so it costs
    no privacy; under DP-SGD it averages out part of the noise the rounds added.

    Partitions (``simulations/partition.py``): ``attribute`` (one client per value of the user
    attribute ``partition_attribute``, e.g. ``region``, ``community``), ``group`` (a user's most
    frequent interaction group, e.g. merchant), ``iid``, ``dirichlet-size`` and ``dirichlet-label``
    (``num_clients`` clients, concentration ``dirichlet_alpha``). In a deployment
    (``data.catalogue`` set) ``num_clients`` is the number of nodes the server waits for before
    round 1 (0: ``min_train_clients``). ``client_cpus`` / ``client_gpus``
    are the simulation engine's resources per client (``client_gpus=-1``: a quarter GPU when CUDA is
    present, none otherwise). ``run_dir`` is where the ServerApp keeps its run directory under
    ``flwr run`` (absolute: the ServerApp runs in the SuperLink's working directory; empty:
    ``runs/flwr-<date>-<time>`` there); ``fedrec simulate`` takes ``--out`` instead.
    """

    num_rounds: int = 20
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    min_train_clients: int = 1
    local_epochs: int = 1
    lr_schedule: str = "cosine"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_lr_schedule: str = "constant"
    server_lr_final: float = 0.1
    server_ema: float = 0.0
    partition: str = "attribute"
    partition_attribute: str = "region"
    num_clients: int = 0
    dirichlet_alpha: float = 0.5
    seed: int = 0
    evaluate_every: int = 1
    round_timeout: float = 3600.0
    client_cpus: int = 1
    client_gpus: float = -1.0
    run_dir: str = ""

    def __post_init__(self) -> None:
        checks = [
            ("num_rounds", self.num_rounds >= 1, ">= 1"),
            ("strategy", self.strategy in STRATEGIES, f"one of {STRATEGIES}"),
            ("fraction_train", 0.0 < self.fraction_train <= 1.0, "in (0, 1]"),
            ("min_train_clients", self.min_train_clients >= 1, ">= 1"),
            ("local_epochs", self.local_epochs >= 1, ">= 1"),
            ("lr_schedule", self.lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
            ("server_lr_schedule", self.server_lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
            ("proximal_mu", self.proximal_mu >= 0, ">= 0"),
            ("server_lr", self.server_lr > 0, "> 0"),
            ("server_beta1", 0 <= self.server_beta1 < 1, "in [0, 1)"),
            ("server_beta2", 0 <= self.server_beta2 < 1, "in [0, 1)"),
            ("server_tau", self.server_tau > 0, "> 0"),
            ("server_ema", 0 <= self.server_ema < 1, "in [0, 1) (0: off)"),
            ("server_lr_final", 0 <= self.server_lr_final <= 1,
             "in [0, 1]: the cosine server schedule's last-round learning rate as a fraction of server_lr"),
            ("partition", self.partition in PARTITIONS, f"one of {PARTITIONS}"),
            ("num_clients", self.num_clients >= 0, ">= 0"),
            ("num_clients", self.partition in ("attribute", "group") or self.num_clients >= 1,
             f">= 1 for partition={self.partition!r}"),
            ("dirichlet_alpha", self.dirichlet_alpha > 0, "> 0"),
            ("evaluate_every", self.evaluate_every >= 1, ">= 1"),
            ("round_timeout", self.round_timeout > 0, "> 0"),
            ("client_cpus", self.client_cpus >= 1, ">= 1"),
            ("client_gpus", self.client_gpus == -1.0 or 0.0 <= self.client_gpus <= 1.0, "-1 (auto) or in [0, 1]"),
        ]
        check_fields(self, checks, prefix='federation.')


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-side privacy (``privacy/``): user-level DP-SGD with Opacus.

    ``mode="dp-sgd"``: every client trains with DP-SGD; the unit of privacy is one user's whole
    history at that client. Each step Poisson-samples users at rate q = 1 / ceil(n / B)
    (n the client's users, B = ``train.batch_size``: the expected batch), clips each user's whole
    gradient to ``max_grad_norm`` and adds Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm``. Give either ``noise_multiplier`` (> 0) or
    ``target_epsilon`` (> 0): the latter calibrates the noise once for the whole planned horizon
    (``federation.num_rounds`` x ``federation.local_epochs`` epochs, as if the client took part in
    every round: conservative when ``fraction_train`` < 1), never per round. ``delta`` = 0 means
    1 / (10 n) per client. ``accountant`` (``prv`` or ``rdp``) is the one epsilon is reported
    with. ``grad_sample_mode`` is Opacus' per-sample gradient mode (``hooks`` or ``ew``).
    ``sample_rate`` (0: derived as above): one Poisson rate q = 1/k (k an integer) for every client
    instead, so a client's expected batch is q n; every client then spends the same epsilon per
    step (with q from ``train.batch_size``, larger clients sample at lower rates and spend less
    than the smallest). A client needs at least k users.
    ``sample_rate_for_epsilon`` e (0: off; distributed noise only, with ``noise_multiplier``): each
    client samples at the largest rate q <= 1 with which ``federation.num_rounds`` steps at
    ``noise_multiplier`` spend exactly epsilon e at its own delta
    (:func:`privacy.accounting.sample_rate_for_target_epsilon`), so every client spends its whole
    budget instead of only the one with the smallest delta (with one q everywhere the others spend
    less). Clients then differ in rate: a smaller client, with its larger delta, samples a little
    more often. Each client computes its rate from its own size; nothing else is needed.
    ``embedding_clip_share`` s (0: flat clipping): clip each user's gradient in two groups, the
    item-embedding table to ``max_grad_norm * sqrt(s)`` and all other parameters together to
    ``max_grad_norm * sqrt(1 - s)``; the whole gradient stays within ``max_grad_norm``, so noise and
    accounting are unchanged. Flat clipping scales the small transformer part of a gradient by the
    same factor as the much larger embedding part; a group of its own keeps it whole.
    ``physical_batch_size``: each Poisson batch is run through the model in pieces of at most this
    many users, sorted by history length so that a piece pads only to its own longest user; the
    clipped per-user gradients of all pieces are summed before the one noisy step (the privacy
    accounting is unchanged; memory is bounded and padding is not computed).
    ``state_dir``: where each client keeps its privacy ledger (``<state_dir>/<client>/``; empty:
    the simulation's ``<run dir>/clients``). ``policy``: the operator's policy file (TOML; empty:
    no limits beyond this configuration), see ``privacy/policy.py``.

    Secure aggregation (SecAgg+, ``privacy/secagg.py``; docs/secure-aggregation.md):
    ``secure_aggregation`` is ``"auto"`` (on iff ``mode="dp-sgd"``), ``"on"`` or ``"off"``; when on,
    the server learns only the sum of the clients' masked, quantized updates. Each client contributes
    ``n_k * (w_local - w_global)`` (``n_k`` its users) and ``n_k``, every coordinate within
    ``[-secagg_bound, secagg_bound]`` (a value beyond it is that client's error, never clipped),
    quantized to ``2**-secagg_scale_bits``. ``ceil(secagg_bound * 2**secagg_scale_bits)`` times the
    number of clients in a round must stay below ``2**63``: the defaults (``2**24``, 24 bits) allow
    32,767 clients per round and a quantization error of at most ``2**-25`` on the averaged delta.

    Distributed noise (``noise_placement="distributed"``; docs/privacy.md): instead of a whole local
    epoch of DP-SGD, each round every client takes ONE Poisson-sampled step's clipped gradient sum,
    adds only a share ``noise_multiplier / sqrt(t)`` of the noise (``t`` =
    ``distributed_min_clients``), and sends ``-lr * (sum + noise share) / (q n)`` (one plain-SGD
    step) through secure aggregation. The server's sum then carries noise of multiplier
    ``noise_multiplier`` whenever at least ``t`` clients are in it; a round with fewer is aborted,
    model unchanged. Accounted as one DP-SGD step per round at ``noise_multiplier``: the guarantee
    holds against the server and any party that sees only sums or models, as long as fewer than
    ``t`` clients' noise shares are known to it (a coalition of the server with ``c`` clients faces
    only ``(t - c) / t`` of the noise variance), and as long as the other clients add their shares.
    Needs secure aggregation, ``federation.local_epochs = 1`` and one ``noise_multiplier`` for every
    client (not ``target_epsilon``: per-client calibrations would differ); each client's epsilon
    then follows from its own sample rate over one step per round.

    Transition table (``model.transitions``, ``privacy/transitions.py``): before round 1 every client
    releases its users' clipped item-transition counts once, with Gaussian noise of multiplier
    ``transitions_noise_multiplier`` (the sum's; each client adds its share under distributed
    noise, all of it under local noise), accounted in its ledger as round 0 (one step at sample rate
    1) and composed with the DP-SGD steps; with ``target_epsilon`` (local noise) the DP-SGD noise is
    calibrated for what the release leaves of the budget. Needs ``> 0`` under ``mode="dp-sgd"``; 0
    with ``mode="none"`` (the exact counts are released).

    Empirical audit (``privacy/canaries.py``; ``fedrec audit RUN --empirical``): ``audit_canaries``
    > 0 draws that many canary users (``audit_canary_length`` distinct random items each), spreads
    them over the clients and includes each in its client's training data with probability 1/2
    (they count as that client's users, in the DP accounting too). The simulation writes them to
    ``<run dir>/canaries.json`` and records the path in ``audit_canary_file`` (set it only to reuse
    a canary file). Works with every ``mode``, so that a run without DP can be audited the same way.
    """

    mode: str = "none"
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    physical_batch_size: int = 64
    state_dir: str = ""
    policy: str = ""
    secure_aggregation: str = "auto"
    secagg_bound: float = SECAGG_DEFAULT_BOUND
    secagg_scale_bits: int = SECAGG_DEFAULT_SCALE_BITS
    audit_canaries: int = 0
    audit_canary_length: int = 20
    audit_canary_file: str = ""
    noise_placement: str = "local"
    distributed_min_clients: int = 0
    sample_rate: float = 0.0
    sample_rate_for_epsilon: float = 0.0
    embedding_clip_share: float = 0.0
    transitions_noise_multiplier: float = 0.0

    @property
    def secure_aggregation_enabled(self) -> bool:
        """Whether rounds are securely aggregated: ``"on"``, or ``"auto"`` with ``mode="dp-sgd"``."""
        return self.secure_aggregation == "on" or (self.secure_aggregation == "auto" and self.mode == "dp-sgd")

    def __post_init__(self) -> None:
        dp = self.mode == "dp-sgd"
        bits = self.secagg_scale_bits
        bits_ok = isinstance(bits, int) and not isinstance(bits, bool) and 0 <= bits <= 62
        bound_ok = 0 < self.secagg_bound < math.inf
        checks = [
            ("mode", self.mode in PRIVACY_MODES, f"one of {PRIVACY_MODES}"),
            ("noise_multiplier", self.noise_multiplier >= 0, ">= 0"),
            ("target_epsilon", self.target_epsilon >= 0, ">= 0"),
            ("noise_multiplier", not dp or (self.noise_multiplier > 0) != (self.target_epsilon > 0),
             "> 0 with target_epsilon = 0, or 0 with target_epsilon > 0 (exactly one of the two) for mode='dp-sgd'"),
            ("delta", 0 <= self.delta < 1, "in [0, 1) (0: 1 / (10 n) per client)"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("accountant", self.accountant in ("prv", "rdp"), "'prv' or 'rdp'"),
            ("grad_sample_mode", self.grad_sample_mode in ("hooks", "ew"), "'hooks' or 'ew'"),
            ("physical_batch_size", self.physical_batch_size >= 1, ">= 1"),
            ("sample_rate", self.sample_rate == 0 or (0 < self.sample_rate <= 1
                                                     and abs(1 / self.sample_rate - round(1 / self.sample_rate)) < 1e-9),
             "0 (q = 1 / ceil(n / train.batch_size) per client) or 1/k for an integer k >= 1 (Opacus' Poisson "
             "loader samples at 1 / its number of batches)"),
            ("sample_rate_for_epsilon", 0 <= self.sample_rate_for_epsilon < math.inf,
             "a finite number >= 0 (0: off; e > 0: each client samples at the rate that spends epsilon e)"),
            ("sample_rate_for_epsilon", not (dp and self.sample_rate_for_epsilon > 0)
             or (self.noise_placement == "distributed" and self.sample_rate == 0),
             "0 unless privacy.noise_placement='distributed' (one step per round, so the steps are known before "
             "the rate) and privacy.sample_rate=0 (the rate is derived from the epsilon instead)"),
            ("embedding_clip_share", 0 <= self.embedding_clip_share < 1,
             "in [0, 1): 0 clips each user's whole gradient to max_grad_norm (flat); s > 0 clips the item-embedding "
             "table to max_grad_norm*sqrt(s) and the other parameters to max_grad_norm*sqrt(1-s)"),
            ("secure_aggregation", self.secure_aggregation in SECURE_AGGREGATION,
             f"one of {SECURE_AGGREGATION} ('auto': on iff mode='dp-sgd')"),
            ("secagg_bound", bound_ok, "a finite number > 0 (the largest |n_k * (w_local - w_global)| and n_k "
                                       "a client may contribute)"),
            ("secagg_scale_bits", bits_ok, "an int in [0, 62] (fixed-point bits)"),
            ("audit_canaries", self.audit_canaries >= 0, ">= 0 (0: no canaries)"),
            ("transitions_noise_multiplier", 0 <= self.transitions_noise_multiplier < math.inf,
             "a finite number >= 0 (the noise of the transition table's release; 0 unless model.transitions)"),
            ("noise_placement", self.noise_placement in NOISE_PLACEMENTS, f"one of {NOISE_PLACEMENTS}"),
            ("noise_placement", self.noise_placement == "local" or dp,
             "'local' unless mode='dp-sgd' (distributed noise is a DP-SGD mode)"),
            ("noise_placement", self.noise_placement == "local" or not dp or self.secure_aggregation_enabled,
             "'local' when secure aggregation is off: distributed noise protects users only inside a securely "
             "aggregated sum (set privacy.secure_aggregation to 'auto' or 'on')"),
            ("noise_placement", self.noise_placement == "local" or not dp or self.noise_multiplier > 0,
             "'local' with target_epsilon: distributed noise needs one noise_multiplier shared by every client "
             "(each client's own calibration would give the sum less noise than some clients assume); set "
             "privacy.noise_multiplier"),
            ("distributed_min_clients", self.distributed_min_clients >= 0,
             ">= 0 (0: every client sampled in a round; a simulation fills it in)"),
            ("audit_canary_length", self.audit_canary_length >= 3,
             ">= 3 (a canary is a user: one training pair plus the two items leave-one-out holds out)"),
            ("secagg_bound", not (bound_ok and bits_ok)
             or 2 * math.ceil(math.ldexp(min(self.secagg_bound, 2.0**63), bits)) < 2**63,
             f"small enough that 2 * ceil(secagg_bound * 2**secagg_scale_bits) < 2**63 (the sum of two "
             f"clients must fit int64) with secagg_scale_bits={bits}; lower one of them"),
        ]
        check_fields(self, checks, prefix="privacy.")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.privacy.noise_placement == "distributed" and self.federation.local_epochs != 1:
            raise ValueError(f"federation.local_epochs must be 1 with privacy.noise_placement='distributed' (one "
                             f"DP-SGD step per round, summed across clients), got {self.federation.local_epochs}")
        if self.data.catalogue and str(self.model.get("item_features", "")).strip():
            raise ValueError(f"model.item_features={self.model['item_features']!r} is not available in a deployment "
                             f"yet: data.catalogue={self.data.catalogue!r} lists item ids only, not their features "
                             "(use model.item_features in simulations and centralized training)")
        transitions = self.model.get("transitions", False) is True
        sigma = self.privacy.transitions_noise_multiplier
        if transitions and self.privacy.mode == "dp-sgd" and not sigma > 0:
            raise ValueError("privacy.transitions_noise_multiplier must be > 0 with model.transitions = true and "
                             "privacy.mode = 'dp-sgd' (got 0: the transition counts would be released without noise)")
        if sigma > 0 and not transitions:
            raise ValueError(f"privacy.transitions_noise_multiplier = {sigma:g} needs model.transitions = true "
                             "(there is no transition table to release)")
        if sigma > 0 and self.privacy.mode != "dp-sgd":
            raise ValueError(f"privacy.transitions_noise_multiplier = {sigma:g} needs privacy.mode = 'dp-sgd' "
                             f"(got {self.privacy.mode!r}: the release is accounted in the DP ledger)")
        if transitions and self.privacy.sample_rate_for_epsilon > 0:
            raise ValueError("privacy.sample_rate_for_epsilon does not account for the transition table's release "
                             "(model.transitions = true): set privacy.sample_rate instead")

    def model_config(self, num_items: int, num_item_features: int = 0) -> ModelConfig:
        """The model's config for a catalogue of ``num_items`` items whose ``model.item_features``
        matrix (``core_model/features.py``) has ``num_item_features`` columns."""
        return ModelConfig.from_dict({**self.model, "num_items": num_items, "num_item_features": num_item_features})

    def to_dict(self) -> dict[str, Any]:
        return {"data": asdict(self.data), "model": dict(self.model),
                "train": self.train.to_dict(), "eval": asdict(self.eval),
                "federation": asdict(self.federation), "privacy": asdict(self.privacy)}


def _build(cls: type, section: str, values: Mapping[str, Any], exclude: Iterable[str] = ()) -> Any:
    allowed = {f.name: f for f in fields(cls)} if cls is not dict else {}
    for name in exclude:
        allowed.pop(name, None)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}; "
                         f"[{section}] accepts {sorted(allowed)}")
    checked = dict(values)
    for name, value in values.items():
        want = str(allowed[name].type).replace(" | None", "")
        if value is None and "None" in str(allowed[name].type):
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": is_number, "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(want, True)
        if not ok:
            raise ValueError(f"{section}.{name} must be {want}, got {value!r}")
        if want == "float":
            checked[name] = float(value)
    return cls(**checked)


SECTIONS = ("data", "model", "train", "eval", "federation", "privacy")


def build_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping (as read from TOML) into an :class:`ExperimentConfig`."""
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if not isinstance(values.get(section, {}), Mapping):
            raise ValueError(f"[{section}] must be a table, got {values[section]!r}")
    data_values = dict(values.get("data", {}))
    synthetic = data_values.pop("synthetic", {})
    if synthetic:
        from core_model.synthetic import SyntheticConfig
        _build(SyntheticConfig, "data.synthetic", synthetic)  # validate now, not at load time
    model_values = dict(values.get("model", {}))
    _build(ModelConfig, "model", {"num_items": 1, **model_values})  # validate all but num_items
    for derived in ("num_items", "num_item_features"):
        if derived in model_values:
            raise ValueError(f"model.{derived} is taken from the data; do not set it")
    return ExperimentConfig(
        data=DataConfig(**{**asdict(_build(DataConfig, "data", data_values)), "synthetic": dict(synthetic)}),
        model=model_values,
        train=_build(TrainConfig, "train", dict(values.get("train", {}))),
        eval=_build(EvalConfig, "eval", dict(values.get("eval", {}))),
        federation=_build(FederationConfig, "federation", dict(values.get("federation", {}))),
        privacy=_build(PrivacyConfig, "privacy", dict(values.get("privacy", {}))),
    )


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Flower's flat run config (``{"federation.num-rounds": 3, "train.lr": 0.002}``) -> config.

    Keys are dotted ``section.key`` with kebab-case (Flower's convention) or snake_case names;
    an empty run config gives the defaults.
    """
    values: dict[str, Any] = {}
    for dotted, value in run_config.items():
        keys = [k.replace("-", "_") for k in str(dotted).split(".")]
        if len(keys) < 2:
            raise ValueError(f"run config key {dotted!r} must look like section.key")
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return build_config(values)


def flwr_app_config() -> dict[str, Any]:
    """Every setting with its default, as ``[tool.flwr.app.config]`` declares it (kebab-case keys).

    Flower accepts a ``flwr run --run-config`` override only for a key the app declares, so
    pyproject.toml declares them all; a test checks that it matches this function, which reads the
    dataclasses (the one place defaults live). Settings whose default is "none"
    (``train.max_minutes``, ``train.num_threads``) cannot be declared in TOML and so cannot be set
    through ``flwr run``.
    """
    from core_model.synthetic import SyntheticConfig

    defaults = ExperimentConfig().to_dict()
    defaults["model"] = {k: v for k, v in asdict(ModelConfig(num_items=1)).items()
                         if k not in ("num_items", "num_item_features")}
    defaults["data"]["synthetic"] = asdict(SyntheticConfig())
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key.replace('_', '-')}" if prefix else key.replace("_", "-")
            if isinstance(value, Mapping):
                walk(name, value)
            elif value is not None:
                flat[name] = value

    walk("", defaults)
    return flat


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-3"`` -> (["train", "lr"], 0.002); bare words are strings."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read an optional TOML file, apply ``key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return build_config(values)
