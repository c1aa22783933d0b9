"""Plain (centralized, non-private) training of :class:`~core_model.model.SASRec`.

The same pieces are reused by the federated client: :class:`SequenceBatches` turns training
sequences into (inputs, targets) tensors, :func:`sample_negatives` draws catalogue negatives per
user, :func:`train_epoch` runs one pass. :func:`fit` adds validation, early stopping, a time
budget, metrics as JSON lines and checkpoints. Progress is reported through a callback; the
command-line layer turns it into a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core_model.allocator import keep_freed_memory, release_freed_memory
from core_model.data import LeaveOneOutSplit
from core_model.evaluate import evaluate_ranking
from core_model.model import ModelConfig, SASRec
from core_model.validation import check_fields

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    ``lr`` is the peak learning rate of Adam(W) (betas 0.9 / 0.98 as in SASRec), reached after
    ``warmup_epochs`` of linear warm-up and then held (``schedule="constant"``) or decayed with a
    cosine to 10 % over ``epochs`` (``schedule="cosine"``). Validation runs every ``eval_every``
    epochs; training stops after ``patience`` validations without a better NDCG@10, after
    ``epochs``, or when ``max_minutes`` of training time are used, and the best weights are kept.
    ``precision="bf16"`` runs the forward pass under bfloat16 autocast (weights, optimizer state
    and the loss stay float32); on CPUs with AVX-512 BF16 it is ~1.4x faster. ``"auto"`` picks
    bf16 on a CUDA GPU that supports it or a CPU with native bf16 instructions, fp32 otherwise.
    ``compile=True`` trains through ``torch.compile`` (measured on a 2-core CPU: no faster than
    eager after a ~40 s warm-up, so off by default; meant for GPUs); if compilation fails training
    goes on eagerly and a warning says so. Evaluation always runs the plain model.
    ``length_buckets`` batches users of similar history length together (less padding).
    ``user_sampling="uniform"`` passes over every user once per epoch; ``"by-length"`` draws users
    with probability proportional to their number of training positions (see
    ``SequenceBatches.shuffled``); for non-private training only (DP-SGD samples users uniformly).
    ``ema`` (0: off): keep an exponential moving average of the weights, updated after every
    optimizer step with this per-step decay, bias-corrected and with its window capped at a fifth of
    the planned run (:class:`WeightEMA`), so that a short run is not an average of its first steps;
    validation, the kept best weights and the checkpoint are then the average's. Centralized
    training only (``fit``).
    ``long_histories="last"`` trains on the last ``max_len`` positions of each history (SASRec's
    truncation; on ML-1M 26 % of users have more and a third of all positions are never seen);
    ``"windows"`` also cuts the earlier positions into consecutive windows of ``max_len``, each a
    training row of its own (see ``SequenceBatches``). Centralized training only (``fit``): a
    federated client's local update and DP-SGD keep one example per user (under DP-SGD the user is
    the unit of privacy), so ``local_train`` and ``dp_local_train`` refuse it. ``"auto"`` (the
    default) is ``"windows"`` in ``fit`` and ``"last"`` in ``local_train`` and ``dp_local_train``;
    :func:`resolve_long_histories` says which one a trainer uses. ``"random"`` is for those two
    per-user trainers: the histories are cut into the same windows, and each time a user is drawn
    (every local epoch; every DP-SGD step the user is sampled in) one of that user's windows, drawn
    with probability proportional to its positions, is the user's one example
    (:meth:`SequenceBatches.draw_windows`). A user stays one example per step, so DP-SGD's unit of
    privacy and its accounting are unchanged, and over the rounds every position is trained on; the
    expected (unclipped) gradient is that of the user's mean loss over the whole history. ``fit``
    refuses it (it trains on every window every epoch with ``"windows"``).
    """

    epochs: int = 90
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    eval_every: int = 5
    patience: int = 4
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    length_buckets: bool = True
    user_sampling: str = "by-length"
    num_threads: int | None = None
    ema: float = 0.998
    long_histories: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("schedule", self.schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("patience", self.patience >= 1, ">= 1"),
            ("max_minutes", self.max_minutes is None or self.max_minutes > 0, "> 0 or None"),
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "'auto', 'cpu', 'cuda' or 'cuda:N'"),
            ("precision", self.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
            ("user_sampling", self.user_sampling in ("uniform", "by-length"), "'uniform' or 'by-length'"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, ">= 1 or None"),
            ("ema", 0 <= self.ema < 1, "in [0, 1) (0: off)"),
            ("long_histories", self.long_histories in LONG_HISTORIES, "'auto', 'last', 'windows' or 'random'"),
        ]
        check_fields(self, checks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LONG_HISTORIES = ("auto", "last", "windows", "random")


def resolve_long_histories(value: str, *, per_user: bool, why: str = "") -> str:
    """The ``train.long_histories`` a trainer uses: ``"last"``, ``"windows"`` or ``"random"``.

    ``per_user=True`` is a trainer whose example is the user (a federated client's local update,
    DP-SGD): ``"auto"`` is ``"last"`` there, ``"random"`` stays, and ``"windows"`` is refused with
    ``why``. Otherwise (centralized ``fit``) ``"auto"`` is ``"windows"`` and ``"random"`` is refused.
    """
    if value not in LONG_HISTORIES:
        raise ValueError(f"train.long_histories must be one of {LONG_HISTORIES}, got {value!r}")
    if not per_user:
        if value == "random":
            raise ValueError("train.long_histories='random' is for trainers whose example is the user (a "
                             "federated client's local update, DP-SGD); centralized training trains on "
                             "every window every epoch with 'windows' (expected 'auto', 'last' or 'windows')")
        return "windows" if value == "auto" else value
    if value == "windows":
        raise ValueError(f"train.long_histories='windows' is for centralized training only: {why} "
                         "(expected 'auto', 'last' or 'random')")
    return "random" if value == "random" else "last"


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)


class SequenceBatches:
    """Next-item training pairs for each user: inputs ``s[:-1]``, targets ``s[1:]`` (last ``max_len``).

    Built once as a (rows, max_len) left-padded matrix; a batch is a set of rows trimmed to its
    longest sequence. Users whose training sequence has fewer than two items yield no pair and
    contribute zero loss (they are kept so that user counts stay exact).

    ``windows=False``: one row per user, its last ``max_len`` positions. ``True``: a user with
    ``m > max_len`` positions gets ``ceil(m / max_len)`` rows: the last ``max_len`` positions, then
    the ``max_len`` before them, and so on (the earliest window is shorter); every position is a
    target exactly once, and the targets at the start of a window see only that window's items,
    as at the start of a truncated history. ``owners[row]`` is the user (index into ``train``) a
    row belongs to. Rows are then the examples of an epoch: not for DP-SGD, whose unit is the user,
    unless each step takes one window per user (:meth:`draw_windows`, ``long_histories="random"``).
    """

    def __init__(self, train: Sequence[np.ndarray], max_len: int, *, windows: bool = False) -> None:
        seqs = [np.asarray(seq, dtype=np.int64) for seq in train]
        spans: list[tuple[int, int, int]] = []  # (user, first target index, end) into seq[1:]
        for user, seq in enumerate(seqs):
            m = max(len(seq) - 1, 0)
            end = m
            spans.append((user, max(end - max_len, 0), end))
            while windows and end > max_len:
                end -= max_len
                spans.append((user, max(end - max_len, 0), end))
        n = len(spans)
        self.inputs = np.zeros((n, max_len), dtype=np.int64)
        self.targets = np.zeros((n, max_len), dtype=np.int64)
        self.lengths = np.zeros(n, dtype=np.int64)
        self.owners = np.fromiter((user for user, _, _ in spans), dtype=np.int64, count=n)
        for row, (user, start, end) in enumerate(spans):
            m = end - start
            if m:
                seq = seqs[user]
                self.inputs[row, max_len - m:] = seq[start:end]
                self.targets[row, max_len - m:] = seq[start + 1:end + 1]
            self.lengths[row] = m
        self.max_len = max_len
        self.num_users = len(seqs)
        self._index_users()

    def _index_users(self) -> None:
        """Where each user's rows are (consecutive: ``first_row[u]`` .. ``+ row_count[u] - 1``) and the
        running count of positions (for :meth:`draw_windows`); built once, not at every draw."""
        self.row_count = np.bincount(self.owners, minlength=self.num_users)
        self.first_row = np.concatenate([[0], np.cumsum(self.row_count)[:-1]]).astype(np.int64)
        self.cum_lengths = np.cumsum(self.lengths)  # positions up to and including each row

    def draw_windows(self, users: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        """One row per user in ``users``: one of that user's windows, drawn with probability
        proportional to its positions (a user without positions gets their one, empty, row).

        With ``windows=False`` every user has one row and that row is returned. The expected loss
        of the drawn window is the user's mean loss over all their positions.
        """
        users = np.asarray(users, dtype=np.int64)
        if len(users) and (users.min() < 0 or users.max() >= self.num_users):
            raise ValueError(f"users must be in [0, {self.num_users}), got {users.min()}..{users.max()}")
        cum = self.cum_lengths
        before = np.where(self.first_row[users] > 0, cum[self.first_row[users] - 1], 0)
        total = cum[self.first_row[users] + self.row_count[users] - 1] - before
        pick = before + np.floor(generator.random(len(users)) * total).astype(np.int64)
        rows = np.searchsorted(cum, pick, side="right")
        return np.where(total > 0, rows, self.first_row[users])

    def select(self, rows: np.ndarray) -> SequenceBatches:
        """A new set of batches made of ``rows`` (in that order): one epoch's drawn windows."""
        rows = np.asarray(rows, dtype=np.int64)
        out = object.__new__(SequenceBatches)
        out.inputs, out.targets = self.inputs[rows], self.targets[rows]
        out.lengths, out.owners = self.lengths[rows], self.owners[rows]
        out.max_len, out.num_users = self.max_len, self.num_users
        out._index_users()
        return out

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_positions(self) -> int:
        return int(self.lengths.sum())

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(int(self.lengths[rows].max()) if len(rows) else 1, 1)
        return (torch.from_numpy(self.inputs[rows, -T:]),  # (B, T)
                torch.from_numpy(self.targets[rows, -T:]))  # (B, T)

    def shuffled(self, batch_size: int, generator: np.random.Generator, *,
                 bucketed: bool = False, by_length: bool = False) -> Iterator[np.ndarray]:
        """Row batches in random order.

        ``bucketed``: users of similar length share a batch (sorted by length with random
        tie-breaks, cut into batches, batches shuffled), so a batch pads to little more than its
        own users' lengths.

        ``by_length=False``: every user is in exactly one batch per epoch. ``True``: users are
        drawn with replacement with probability proportional to their number of training
        positions, as many draws as give the epoch the same expected number of positions as one
        pass over all users. Each user's loss is still the mean over that user's positions, so in
        expectation the gradient equals that of a loss averaged over all positions of the data
        (heavy users weigh more), at the cost per epoch of an ordinary pass.
        """
        if by_length:
            lengths = self.lengths.astype(np.float64)
            total = lengths.sum()
            if total <= 0:
                return
            draws = max(1, int(round(total * total / float((lengths * lengths).sum()))))
            order = generator.choice(len(self), size=draws, replace=True, p=lengths / total)
            if bucketed:
                order = order[np.lexsort((generator.random(len(order)), self.lengths[order]))]
        elif bucketed:
            order = np.lexsort((generator.random(len(self)), self.lengths))  # by length, ties at random
        else:
            order = generator.permutation(len(self))
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        if not bucketed:
            yield from chunks
            return
        for k in generator.permutation(len(chunks)):
            yield chunks[k]


def sample_negatives(
    config: ModelConfig, targets: torch.Tensor, generator: torch.Generator
) -> torch.Tensor | None:
    """Catalogue negatives drawn uniformly per user (``sampled``) or per position (``bce``).

    Never in-batch: each user's negatives come from the whole catalogue ``1..num_items``.
    """
    B, T = targets.shape
    if config.loss == "sampled":
        return torch.randint(1, config.num_items + 1, (B, config.num_negatives), generator=generator)
    if config.loss == "bce":
        neg = torch.randint(1, config.num_items + 1, (B, T), generator=generator)
        clash = neg == targets  # redraw once, then shift: a negative never equals its positive
        neg = torch.where(clash, torch.randint(1, config.num_items + 1, (B, T), generator=generator), neg)
        return torch.where(neg == targets, neg % config.num_items + 1, neg)
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA bf16, or CPU AVX-512 BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``precision="bf16"`` (or ``"auto"`` on native bf16), else a no-op."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_to_tenth(t: float, final: float = 0.1) -> float:
    """Cosine decay from 1 at ``t = 0`` to ``final`` (default 0.1) at ``t = 1`` (``t`` clamped to [0, 1])."""
    t = min(max(t, 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_factor(config: TrainConfig, epoch_progress: float) -> float:
    """Multiplier of the peak learning rate at ``epoch_progress`` (epochs done, fractional)."""
    if config.warmup_epochs > 0 and epoch_progress < config.warmup_epochs:
        return max(epoch_progress / config.warmup_epochs, 1e-3)
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1e-9)
        return cosine_to_tenth((epoch_progress - config.warmup_epochs) / span)
    return 1.0


class WeightEMA:
    """The moving average of a model's weights over optimizer steps (``train.ema``).

    Built on ``torch.optim.swa_utils.AveragedModel`` (``module`` is the averaged model). Each
    step t uses the decay ``b_t = min(decay, 1 - 5 / (epochs * steps per epoch))`` (set by
    :meth:`start_epoch`: the window ``1 / (1 - b)`` is at most a fifth of the planned run) and is
    bias-corrected: ``n_t = b_t n_(t-1) + (1 - b_t)``, ``a_t = a_(t-1) + (1 - b_t) / n_t *
    (w_t - a_(t-1))``, so the average is a weighted mean of the steps' weights (with a constant b:
    ``sum_i b ** (t - i) w_i / sum_i b ** (t - i)``). Without the correction
    (``get_ema_multi_avg_fn``) the first step keeps the weight ``b ** (t - 1)``, 0.55 after 300
    steps at 0.998; without the cap a run shorter than the window (3 epochs of 4 steps) is about
    the plain mean of all its steps, early ones included.
    """

    def __init__(self, model: torch.nn.Module, decay: float, *, epochs: int) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"train.ema={decay!r}: expected a decay in (0, 1)")
        self.decay, self.epochs = decay, epochs
        self.current = decay
        self.norm = 0.0
        self._step_weight = 1.0
        self.averaged = torch.optim.swa_utils.AveragedModel(model, avg_fn=self._avg, use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def start_epoch(self, steps: int) -> None:
        self.current = max(0.0, min(self.decay, 1.0 - 5.0 / (self.epochs * max(steps, 1))))

    def update(self, model: torch.nn.Module) -> None:
        self.norm = self.current * self.norm + (1.0 - self.current)
        self._step_weight = (1.0 - self.current) / self.norm if self.norm > 0 else 1.0
        self.averaged.update_parameters(model)

    def _avg(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        return averaged + (current - averaged) * self._step_weight


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                             weight_decay=config.weight_decay)


def train_epoch(
    model: SASRec,
    batches: SequenceBatches,
    optimizer: torch.optim.Optimizer,
    *,
    config: TrainConfig,
    epoch: int,
    rng: np.random.Generator,
    generator: torch.Generator,
    device: torch.device,
    on_step: Callable[[int, int, float], None] | None = None,
    forward: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
    proximal_mu: float = 0.0,
    anchor: Sequence[torch.Tensor] | None = None,
    average: WeightEMA | None = None,
) -> dict[str, float]:
    """One pass over all users in random batches; returns mean loss and throughput.

    ``forward`` replaces ``model`` for the training forward pass (e.g. a compiled ``model``).
    With ``proximal_mu > 0`` the loss gets FedProx's ``mu / 2 * ||w - anchor||^2`` (Li et al.,
    MLSys 2020), ``anchor`` being the global weights in ``model.parameters()`` order. The
    reported loss is the recommendation loss alone. ``average`` (``train.ema``) is updated after
    every optimizer step.
    """
    if proximal_mu > 0 and anchor is None:
        raise ValueError("proximal_mu > 0 needs the anchor (global) weights")
    forward = forward or model
    keep_freed_memory()
    model.train()
    epoch_batches = list(batches.shuffled(config.batch_size, rng, bucketed=config.length_buckets,
                                          by_length=config.user_sampling == "by-length"))
    steps = max(len(epoch_batches), 1)
    if average is not None:
        average.start_epoch(steps)
    total, users, start = 0.0, 0, time.perf_counter()
    for step, rows in enumerate(epoch_batches):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, epoch + step / steps)
        inputs, targets = batches.batch(rows)
        negatives = sample_negatives(model.config, targets, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        negatives = negatives.to(device) if negatives is not None else None
        with autocast(device, config.precision):
            _, loss = forward(inputs, targets, negatives)
        optimizer.zero_grad(set_to_none=True)
        if proximal_mu > 0:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            (loss + 0.5 * proximal_mu * prox).backward()
        else:
            loss.backward()
        optimizer.step()
        if average is not None:
            average.update(model)
        loss_value = float(loss.detach())
        total += loss_value * len(rows)
        users += len(rows)
        if on_step is not None:
            on_step(step + 1, steps, loss_value)
    seconds = time.perf_counter() - start
    return {"loss": total / max(users, 1), "seconds": seconds, "users_per_second": users / seconds}


def local_train(
    model: SASRec,
    train: Sequence[np.ndarray],
    config: TrainConfig,
    *,
    epochs: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train ``model`` in place for ``epochs`` passes over ``train`` at the constant ``config.lr``.

    The federated client's local update: a fresh optimizer each call (no optimizer state crosses
    rounds), seeded with ``seed`` so that an update is reproducible. Returns the mean loss of the
    last pass, the loss of the first, users and seconds.
    """
    device = select_device(config.device)
    model.to(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    mode = resolve_long_histories(config.long_histories, per_user=True,
                                  why="a client's local update keeps one row per user")
    windows = SequenceBatches(train, model.config.max_len, windows=mode == "random")
    batches = windows
    optimizer = make_optimizer(model, config)
    # a local epoch is a pass over every user of the client (by-length sampling is for ``fit``)
    flat = TrainConfig(**{**config.to_dict(), "schedule": "constant", "warmup_epochs": 0.0,
                          "user_sampling": "uniform"})
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    first, stats = None, {}
    for epoch in range(epochs):
        if mode == "random":  # each epoch one window per user
            batches = windows.select(windows.draw_windows(np.arange(windows.num_users), rng))
        stats = train_epoch(model, batches, optimizer, config=flat, epoch=epoch, rng=rng, generator=generator,
                            device=device, proximal_mu=proximal_mu, anchor=anchor)
        first = stats["loss"] if first is None else first
    release_freed_memory()  # a client idles between rounds: give its free pages back
    return {"loss": stats["loss"], "first_epoch_loss": first, "users": windows.num_users,
            "seconds": stats["seconds"] * epochs}


def evaluate_model(
    model: SASRec,
    split: LeaveOneOutSplit,
    *,
    which: str = "test",
    exclude_history: bool = True,
    sampled: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Leave-one-out metrics of ``model`` on the validation or test targets of ``split``."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    histories = split.valid_inputs() if which == "valid" else split.test_inputs()
    targets = split.valid_targets if which == "valid" else split.test_targets
    model.eval()
    with torch.no_grad():
        return evaluate_ranking(model.score, histories, targets, num_items=split.num_items,
                                max_len=model.config.max_len, exclude_history=exclude_history,
                                sampled=sampled, device=device)


def save_checkpoint(path: Path, model: SASRec, *, extra: dict[str, Any]) -> None:
    """Weights, model config and whatever ``extra`` holds (vocabulary, train config, metrics)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": "fedrec-sasrec-1", "model_config": model.config.to_dict(),
                "state_dict": state, **extra}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[SASRec, dict[str, Any]]:
    """Rebuild the model of a checkpoint; returns (model in eval mode, the whole checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fedrec-sasrec-1":
        raise ValueError(f"{path} is not a fedrec checkpoint (expected format 'fedrec-sasrec-1')")
    model = SASRec(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


def compiled_forward(model: SASRec) -> Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]:
    """``torch.compile(model)``, falling back to the eager model (with a warning) if compiling fails."""
    compiled = torch.compile(model, dynamic=True)
    state = {"fn": compiled}

    def forward(*args: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        try:
            return state["fn"](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: train eagerly instead
            if state["fn"] is model:
                raise
            logger.warning("torch.compile failed (%s: %s); training without compilation",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            state["fn"] = model
            return model(*args)
    return forward


def fit(
    model: SASRec,
    split: LeaveOneOutSplit,
    config: TrainConfig,
    *,
    run_dir: Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_evaluate: Callable[[SASRec], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train with validation-based early stopping; keep (and checkpoint) the best weights.

    Writes ``metrics.jsonl`` (one JSON object per epoch) and ``model.pt`` (best weights) into
    ``run_dir`` when it is given. Returns a summary with the best validation metrics.
    ``on_evaluate(model)`` is called after each validation with the evaluated model (the moving
    average with ``train.ema``); what it returns is added to that epoch's record (benchmarks use it
    for a test curve; the best epoch is chosen on validation alone).
    """
    device = select_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    windows = resolve_long_histories(config.long_histories, per_user=False) == "windows"
    batches = SequenceBatches(split.train, model.config.max_len, windows=windows)
    optimizer = make_optimizer(model, config)
    metrics_file = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
    best: dict[str, Any] = {"valid_ndcg@10": -1.0, "epoch": 0}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bad_evals, train_seconds, epoch = 0, 0.0, 0
    stop_reason = "epochs"
    forward = compiled_forward(model) if config.compile else model
    average = None
    if config.ema:  # evaluated, kept and saved instead of the raw weights
        average = WeightEMA(model, config.ema, epochs=config.epochs)
    served = model if average is None else average.module
    try:
        for epoch in range(1, config.epochs + 1):
            stats = train_epoch(model, batches, optimizer, config=config, epoch=epoch - 1, rng=rng,
                                generator=generator, device=device, on_step=on_step, forward=forward,
                                average=average)
            train_seconds += stats["seconds"]
            record: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"],
                                      "epoch_seconds": stats["seconds"],
                                      "users_per_second": stats["users_per_second"],
                                      "train_minutes": train_seconds / 60}
            out_of_time = config.max_minutes is not None and train_seconds >= config.max_minutes * 60
            if epoch % config.eval_every == 0 or epoch == config.epochs or out_of_time:
                valid = evaluate_model(served, split, which="valid", sampled=False, device=device)
                record.update({f"valid_{k}": v for k, v in valid.items() if k != "users"})
                if on_evaluate is not None:
                    record.update(on_evaluate(served))
                if record["valid_ndcg@10"] > best["valid_ndcg@10"]:
                    best = {"epoch": epoch, **{k: v for k, v in record.items() if k.startswith("valid_")}}
                    best_state = {k: v.detach().clone() for k, v in served.state_dict().items()}
                    bad_evals = 0
                    if run_dir is not None:
                        save_checkpoint(run_dir / "model.pt", served,
                                        extra={**(checkpoint_extra or {}), "train_config": config.to_dict(),
                                               "best": best})
                else:
                    bad_evals += 1
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if on_epoch is not None:
                on_epoch(record)
            if bad_evals >= config.patience:
                stop_reason = f"no better validation NDCG@10 in {config.patience} evaluations"
                break
            if out_of_time:
                stop_reason = f"time budget of {config.max_minutes} minutes used"
                break
    finally:
        if metrics_file is not None:
            metrics_file.close()
    model.load_state_dict(best_state)
    return {"best": best, "epochs_run": epoch, "train_seconds": train_seconds, "stop_reason": stop_reason,
            "positions_per_epoch": batches.num_positions, "parameters": model.num_parameters()}
