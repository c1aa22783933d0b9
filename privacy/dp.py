"""User-level DP-SGD for one client's local training: the only caller of Opacus' ``make_private``.

The unit of privacy is one user's whole history at this client: each step samples users
independently with probability q (Poisson sampling), computes each sampled user's gradient of their
own loss (the mean over their positions), clips it to ``max_grad_norm`` (flat clipping over all
parameters), sums, adds Gaussian noise N(0, (noise_multiplier * max_grad_norm)^2) and divides by
the expected batch size (Abadi et al., CCS 2016). Empty Poisson batches still take a step (noise
only) and are counted.

Randomness: the Poisson sampling and the noise use their own ``torch.Generator`` seeded from the
OS (``secrets``), never from the run's seed, which the server knows. They are not
cryptographically secure generators (Opacus' ``secure_mode`` needs ``torchcsprng``, which has no
build for this torch), and floating-point attacks on Gaussian sampling (Mironov, CCS 2012) are
not mitigated: the guarantee is the textbook one for ideal Gaussian noise.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from core_model.allocator import keep_freed_memory, release_freed_memory
from core_model.config import PrivacyConfig
from core_model.model import SASRec
from core_model.train import (SequenceBatches, TrainConfig, make_optimizer, resolve_long_histories, sample_negatives,
                              select_device)
from privacy.accounting import default_delta, noise_for_target_epsilon, sample_rate_for_target_epsilon
from privacy.transitions import release_history

logger = logging.getLogger(__name__)

MECHANISM = ("DP-SGD (Opacus): Poisson-sampled users, each user's whole-history gradient clipped, "
             "Gaussian noise")


def distributed_mechanism(min_clients: int) -> str:
    """The ledger's mechanism string for distributed noise (``privacy.noise_placement="distributed"``)."""
    return (f"distributed DP-SGD (Opacus): Poisson-sampled users, each user's whole-history gradient clipped; "
            f"this client adds 1/sqrt({min_clients}) of the noise and releases one SGD step only inside a "
            f"securely aggregated sum of at least {min_clients} clients (the recorded noise multiplier is the "
            f"sum's; against a party that knows c of those clients' noise shares, only ({min_clients} - c) / "
            f"{min_clients} of its variance remains)")


def clipping_description(embedding_clip_share: float) -> str:
    """How each user's gradient is clipped, for the ledger's mechanism string (empty for flat clipping)."""
    if not embedding_clip_share:
        return ""
    return (f"; clipped in two groups: the item-embedding table to C*sqrt({embedding_clip_share:g}), every other "
            f"parameter together to C*sqrt({1 - embedding_clip_share:g}) (the whole gradient stays within C)")


def noise_share(noise_multiplier: float, min_clients: int) -> float:
    """One client's share of the noise: ``noise_multiplier / sqrt(min_clients)``.

    Independent Gaussian shares add in variance: ``t`` shares of standard deviation
    ``sigma C / sqrt(t)`` sum to one of ``sigma C``, the noise of one DP-SGD step on the union of the
    clients' users (every user is at one client, so adding or removing one moves the sum by at most
    ``C``). With more than ``t`` clients in the sum the noise only grows.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ValueError(f"min_clients must be an int >= 1, got {min_clients!r}")
    return noise_multiplier / math.sqrt(min_clients)


@dataclass(frozen=True)
class DPPlan:
    """The mechanism's parameters for one client (fixed for the whole run)."""

    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    max_grad_norm: float
    delta: float
    accountant: str
    num_users: int
    embedding_clip_share: float = 0.0


def plan_dp(privacy: PrivacyConfig, *, num_users: int, batch_size: int, planned_epochs: int,
            planned_steps: int | None = None) -> DPPlan:
    """Sampling rate, noise and delta for a client with ``num_users`` users.

    q = 1 / ceil(n / B) (Opacus' convention: ``steps_per_epoch`` = ceil(n / B) expected batches of
    B users), or ``privacy.sample_rate`` = 1/k at every client (``steps_per_epoch`` = k), or the
    rate with which ``planned_steps`` steps at ``privacy.noise_multiplier`` spend
    ``privacy.sample_rate_for_epsilon`` at this client's delta (``steps_per_epoch`` = ceil(1 / q)). With
    ``privacy.target_epsilon`` the noise is calibrated once so that
    ``planned_epochs`` epochs (the whole run) spend exactly that epsilon at delta, or
    ``planned_steps`` steps when given (distributed noise: one step per round), after the
    transition table's release when there is one (:func:`privacy.transitions.release_history`).
    """
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if planned_epochs < 1:
        raise ValueError(f"planned_epochs must be >= 1, got {planned_epochs}")
    if planned_steps is not None and planned_steps < 1:
        raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
    delta = privacy.delta or default_delta(num_users)
    if privacy.sample_rate_for_epsilon > 0:
        if planned_steps is None or privacy.noise_multiplier <= 0:
            raise ValueError("privacy.sample_rate_for_epsilon needs the planned steps (distributed noise: one per "
                             "round) and privacy.noise_multiplier > 0")
        q = sample_rate_for_target_epsilon(target_epsilon=privacy.sample_rate_for_epsilon, delta=delta,
                                           noise_multiplier=privacy.noise_multiplier, steps=planned_steps,
                                           accountant=privacy.accountant)
        if q * num_users < 1:
            raise ValueError(f"privacy.sample_rate_for_epsilon={privacy.sample_rate_for_epsilon!r} gives this client "
                             f"of {num_users} users the rate {q:.4g}, an expected batch below one user; raise the "
                             f"epsilon or lower privacy.noise_multiplier")
        steps_per_epoch = math.ceil(1 / q)
    elif privacy.sample_rate > 0:
        steps_per_epoch = round(1 / privacy.sample_rate)
        if num_users < steps_per_epoch:
            raise ValueError(f"privacy.sample_rate=1/{steps_per_epoch} needs at least {steps_per_epoch} users at a "
                             f"client (an expected batch of at least one user), this client has {num_users}")
        q = 1.0 / steps_per_epoch
    else:
        steps_per_epoch = math.ceil(num_users / batch_size)
        q = 1.0 / steps_per_epoch
    if privacy.noise_multiplier > 0:
        sigma = privacy.noise_multiplier
    else:
        sigma = noise_for_target_epsilon(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q,
                                         steps=planned_steps or planned_epochs * steps_per_epoch,
                                         accountant=privacy.accountant, preceding=release_history(privacy))
    return DPPlan(noise_multiplier=float(sigma), sample_rate=q, steps_per_epoch=steps_per_epoch,
                  max_grad_norm=privacy.max_grad_norm, delta=delta, accountant=privacy.accountant,
                  num_users=num_users, embedding_clip_share=privacy.embedding_clip_share)


def shared_noise_multiplier(privacy: PrivacyConfig, *, client_sizes: Sequence[int], batch_size: int,
                            target_epsilon: float, steps: int) -> float:
    """The one noise multiplier with which EVERY client spends at most ``target_epsilon`` in ``steps`` steps.

    For distributed noise, where all clients must use the same multiplier: the largest of the
    clients' own calibrations (each at its own sample rate and delta, as :func:`plan_dp` sets them),
    so the client with the highest rate or smallest delta spends exactly the target and the others
    less. Needs every client's number of users, which a simulation knows and a deployed client does not.
    """
    if not client_sizes:
        raise ValueError("client_sizes is empty: the shared multiplier needs every client's number of users")
    probe = replace(privacy, mode="dp-sgd", noise_multiplier=0.0, target_epsilon=float(target_epsilon),
                    noise_placement="local")
    return max(plan_dp(probe, num_users=int(n), batch_size=batch_size, planned_epochs=1,
                       planned_steps=steps).noise_multiplier for n in sorted(set(client_sizes)))


def release_noise_for_share(privacy: PrivacyConfig, *, client_sizes: Sequence[int], target_epsilon: float,
                            share: float) -> float:
    """The transition table's release noise with which the release alone spends ``share`` of
    ``target_epsilon`` at every client (``privacy/transitions.py``; one Gaussian step at sample rate 1):
    the largest of the clients' calibrations, each at its own delta (the smallest delta binds), so
    that DP-SGD keeps at least ``1 - share`` of the budget everywhere (composition is not additive:
    it keeps more)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1): the part of the target the release may spend, got {share!r}")
    if not client_sizes:
        raise ValueError("client_sizes is empty: the release noise needs every client's number of users")
    deltas = sorted({privacy.delta or default_delta(int(n)) for n in client_sizes})
    return max(noise_for_target_epsilon(target_epsilon=share * target_epsilon, delta=d, sample_rate=1.0, steps=1,
                                        accountant=privacy.accountant) for d in deltas)


def group_clip_bounds(model: SASRec, max_grad_norm: float, embedding_clip_share: float) -> list[float]:
    """Per parameter of ``model`` (in ``model.parameters()`` order) the bound of its clipping group.

    ``embedding_clip_share`` s in (0, 1): the item-embedding table is one group, clipped to
    ``C sqrt(s)``; all other parameters together are the other, clipped to ``C sqrt(1 - s)``. A user's
    clipped gradient then has norm at most ``sqrt(C^2 s + C^2 (1 - s)) = C``: the sensitivity, and so
    the noise ``noise_multiplier * C`` and the accounting, are those of flat clipping to C.
    """
    if not 0 < embedding_clip_share < 1:
        raise ValueError(f"embedding_clip_share must be in (0, 1) for group clipping, got {embedding_clip_share!r}")
    emb = model.item_emb.weight
    return [max_grad_norm * math.sqrt(embedding_clip_share if p is emb else 1 - embedding_clip_share)
            for p in model.parameters() if p.requires_grad]


@functools.cache
def _group_clipping_optimizer():
    """(Opacus' ``DPOptimizer``, its subclass with flat clipping inside each group of parameters), built
    once (Opacus is imported lazily)."""
    from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

    class GroupClipDPOptimizer(DPOptimizer):
        """Clips each user's gradient restricted to each group to that group's bound; noise and
        accounting are DPOptimizer's, at ``max_grad_norm`` = the root of the sum of the groups' squared
        bounds. ``group_bounds``: one per parameter; ``group_of``: one group index per parameter (two
        groups may have equal bounds, so the index, not the bound, says which group a parameter is in)."""

        group_bounds: list[float]
        group_of: list[int]

        def clip_and_accumulate(self) -> None:
            samples = self.grad_samples
            factors = {}
            for k in sorted(set(self.group_of)):
                if len(samples[0]) == 0:  # empty Poisson batch
                    factors[k] = torch.zeros((0,), device=samples[0].device)
                    continue
                members = [i for i, g in enumerate(self.group_of) if g == k]
                norm = torch.stack([samples[i].reshape(len(samples[i]), -1).norm(2, dim=-1) for i in members],
                                   dim=1).norm(2, dim=1)
                factors[k] = (self.group_bounds[members[0]] / (norm + 1e-6)).clamp(max=1.0)
            for p, k in zip(self.params, self.group_of):
                _check_processed_flag(p.grad_sample)
                grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
                grad = torch.einsum("i,i...", factors[k].to(grad_sample.device, p.dtype), grad_sample)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)

    return DPOptimizer, GroupClipDPOptimizer


def _os_seeded() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def dp_local_train(
    model: SASRec,
    train: Sequence[np.ndarray],
    config: TrainConfig,
    plan: DPPlan,
    *,
    epochs: int,
    grad_sample_mode: str = "hooks",
    physical_batch_size: int = 64,
    max_steps: int | None = None,
    sgd: bool = False,
) -> dict[str, float]:
    """Train ``model`` in place with DP-SGD for ``epochs`` x ``plan.steps_per_epoch`` steps.

    ``max_steps``: stop after that many steps. ``sgd``: plain SGD (no momentum, no weight decay)
    instead of the configured AdamW, with the step scaled so that it is linear in the noisy gradient
    sum with the same factor at every client: ``update = -lr * (clipped sum + noise) / n`` (``n`` =
    this client's users), i.e. ``n * update = -lr * (sum + noise)``, which is what secure
    aggregation adds up (distributed noise needs exactly that: a client-dependent factor such as
    Opacus' ``1 / (q n)`` would weigh one client's users against the others' noise).

    The learning rate is ``config.lr``, held constant (the server sets it per round). Runs in
    float32 (per-sample gradients under bf16 autocast are not validated). The weights stay in
    ``model`` under their own names (Opacus wraps the module; nothing is renamed). Each Poisson
    batch is sorted by history length and run in pieces of at most ``physical_batch_size`` users,
    each trimmed to its own longest history; Opacus clips every user's gradient in every piece and
    sums them, and only the last piece's ``step`` adds the noise and moves the weights (one
    accounted step per Poisson batch, as without pieces). Returns the mean loss of the last epoch,
    the steps taken (empty batches included), users sampled, seconds.
    """
    if physical_batch_size < 1:
        raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size}")
    mode = resolve_long_histories(config.long_histories, per_user=True,
                                  why="windows would make a user several examples, and DP-SGD's unit of privacy is the user")
    from opacus import PrivacyEngine
    from opacus.data_loader import wrap_collate_with_empty
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data import default_collate

    if len(train) != plan.num_users:
        raise ValueError(f"the plan is for {plan.num_users} users, the data has {len(train)}")
    device = select_device(config.device)
    keep_freed_memory()
    model.to(device)
    model.packed = False  # one row per user through every layer: per-user gradients need it
    # "random": the histories cut into windows, and a sampled user's example is one of their windows,
    # drawn afresh each step (still one clipped example per user per step: same sensitivity, same accounting)
    batches = SequenceBatches(train, model.config.max_len, windows=mode == "random")
    window_rng = np.random.default_rng()  # OS-seeded; which window is drawn does not affect the guarantee
    flat = replace(config, schedule="constant", warmup_epochs=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr) if sgd else make_optimizer(model, flat)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    # Poisson sampling at exactly plan.sample_rate (Opacus' own sampler, which would otherwise use
    # 1 / len(loader)), steps_per_epoch batches an epoch, empty batches allowed (Opacus' collate wrapper)
    users = TensorDataset(torch.arange(batches.num_users))
    sampler = UniformWithReplacementSampler(num_samples=batches.num_users, sample_rate=plan.sample_rate,
                                            generator=_os_seeded(), steps=plan.steps_per_epoch)
    loader = DataLoader(users, batch_sampler=sampler, collate_fn=wrap_collate_with_empty(
        collate_fn=default_collate, sample_empty_shapes=[(0,)], dtypes=[torch.long]))
    with warnings.catch_warnings():
        # stated in the module docstring: sampling and noise come from OS-seeded torch generators
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="prv")
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, poisson_sampling=False, grad_sample_mode=grad_sample_mode,
            noise_generator=_os_seeded())
    module.forbid_grad_accumulation()  # what make_private does with poisson_sampling=True
    if plan.embedding_clip_share:
        base, grouped = _group_clipping_optimizer()
        if type(dp_optimizer) is not base:
            raise RuntimeError(f"group clipping needs Opacus' DPOptimizer, make_private returned {type(dp_optimizer)}")
        bounds = group_clip_bounds(model, plan.max_grad_norm, plan.embedding_clip_share)
        if len(bounds) != len(dp_optimizer.params):
            raise RuntimeError(f"{len(bounds)} clipping bounds for {len(dp_optimizer.params)} parameters")
        dp_optimizer.__class__ = grouped  # same state; only clip_and_accumulate differs
        dp_optimizer.group_bounds = bounds
        emb = model.item_emb.weight
        dp_optimizer.group_of = [0 if p is emb else 1 for p in dp_optimizer.params]
    if sgd:  # Opacus divides by its expected batch size; make the step -lr * (sum + noise) / n
        for group in dp_optimizer.param_groups:
            group["lr"] = config.lr * dp_optimizer.expected_batch_size / batches.num_users
    negatives_rng = _os_seeded()
    steps, sampled, start = 0, 0, time.perf_counter()
    total, seen = 0.0, 0
    try:
        module.train()
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for batch in dp_loader:
                if max_steps is not None and steps >= max_steps:
                    break
                rows = batch[0] if len(batch) else torch.empty(0, dtype=torch.long)
                dp_optimizer.zero_grad(set_to_none=True)
                if len(rows) == 0:
                    # empty Poisson batch: a noise-only step, still counted by the accountant
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    dp_optimizer.step()
                    steps += 1
                    continue
                idx = batches.draw_windows(rows.numpy(), window_rng)  # user -> row (the user's own row for "last")
                idx = idx[np.argsort(batches.lengths[idx], kind="stable")]
                pieces = [idx[k:k + physical_batch_size] for k in range(0, len(idx), physical_batch_size)]
                for j, piece in enumerate(pieces):
                    inputs, targets = batches.batch(piece)  # trimmed to this piece's longest user
                    negatives = sample_negatives(model.config, targets, negatives_rng)
                    inputs, targets = inputs.to(device), targets.to(device)
                    negatives = negatives.to(device) if negatives is not None else None
                    _, loss = module(inputs, targets, negatives)
                    with warnings.catch_warnings():
                        # Opacus' backward hooks on the embedding, whose inputs (item ids) need no gradient
                        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
                        loss.backward()
                    last = j == len(pieces) - 1
                    if not last:  # clip and add this piece's per-user gradients; no noise, no update yet
                        dp_optimizer.signal_skip_step(do_skip=True)
                    dp_optimizer.step()
                    if not last:
                        dp_optimizer.zero_grad(set_to_none=True)  # per-user gradients go; the clipped sum stays
                    total += float(loss.detach()) * len(piece)
                steps += 1
                sampled += len(idx)
                seen += len(idx)
    finally:
        if hasattr(module, "_close"):  # remove Opacus' hooks from the model
            module._close()
        model.packed = True
        release_freed_memory()
    opacus_steps = sum(s for _, _, s in engine.accountant.history)
    if opacus_steps != steps:  # our count is what the ledger records: it must agree with Opacus'
        raise RuntimeError(f"Opacus' accountant counted {opacus_steps} steps, training took {steps}")
    return {"loss": total / max(seen, 1), "steps": steps, "users_sampled": sampled,
            "seconds": time.perf_counter() - start}
