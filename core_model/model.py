"""SASRec-style causal Transformer user encoder that scores items by dot product.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (SASRec), trained with
the losses of Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better
than SASRec?", RecSys 2023 (full softmax cross-entropy, or sampled softmax over catalogue
negatives), or the paper's original binary cross-entropy with one negative.

Where this deviates from the paper's reference code:

* Batches are left-padded only to their own longest history; position ids are computed from
  the real items (counted from the start of the history by default, as the reference code's
  right padding does), and attention masks padded keys as well as future keys, so an output
  never depends on how much padding a batch has.
* Every trainable weight is used only through its own module call (``nn.Linear`` for attention,
  the tied output layer shares its ``weight`` Parameter with the item embedding at module level).
  This is what Opacus needs to compute correct per-user gradients: a raw ``h @ emb.weight.T``
  would silently drop that gradient path.
* The loss is reduced per user first (mean over that user's positions) and then over users, so
  that one user's whole sequence is one example (the unit of privacy for DP-SGD).

Imports torch (and the stdlib-only core_model.validation) only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core_model.validation import check_fields

LOSSES = ("ce", "sampled", "bce")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss of :class:`SASRec`.

    Parameters
    ----------
    num_items
        Catalogue size; items are ``1..num_items`` and 0 is padding.
    max_len
        Longest history the encoder reads (older items are cut).
    d_model, num_blocks, num_heads, dropout
        Transformer width, depth, attention heads and dropout probability.
    ff_mult
        Width of the feed-forward layer as a multiple of ``d_model`` (SASRec: 1, the default;
        BERT4Rec and RecBole: 4, which costs ~20 % more per ML-1M epoch on CPU).
    block
        ``"sasrec"``: the block of SASRec's reference code (Kang & McAuley; the PyTorch port used
        by Klenitskiy & Vasilev 2023): ``q = LN(x); x = q + Attn(q, x, x); x = LN(x);
        x = x + FFN(x)``. ``"pre_ln"``: the GPT-2 style ``x = x + Attn(LN(x)); x = x + FFN(LN(x))``.
    positions
        ``"from_start"``: position k is the k-th item of the (cut) history, as in the reference
        code, which pads on the right; ``"from_end"``: position 0 is the most recent item, as
        with SASRec's original fixed-length left padding.
    init_std
        Standard deviation of the normal initialisation of embeddings and linear layers.
    loss
        ``"ce"`` full softmax cross-entropy over the catalogue (default), ``"sampled"`` softmax over
        the target and ``num_negatives`` catalogue negatives per user, ``"bce"`` binary
        cross-entropy with one negative per position (the SASRec paper).
    num_negatives
        Negatives per user for ``loss="sampled"``.
    tie_weights
        Score items with the input item embedding (SASRec) rather than a separate output table.
    attn_init
        ``"normal"``: the query, key and value projections start from N(0, ``init_std``) like every
        other layer. ``"xavier"``: they start Xavier-uniform over the stacked (3d, d) in-projection,
        biases zero, as ``torch.nn.MultiheadAttention`` does in the SASRec reference code (whose
        normal initialisation reaches only its output projection); attention is then sharper at
        the start of training.
    attn_output_dropout
        Dropout on the attention output before the residual sum (True); the reference code has
        none there (False), only on the attention weights.
    item_features
        Comma-separated names of public catalogue features (``"genres,year"``; empty: none) whose
        matrix (``core_model/features.py``) the model reads: an item's input vector adds
        ``W_in f_i`` to its id embedding and its score adds ``h . W_out^T f_i``, with ``W_in`` (d, F)
        and ``W_out`` (F, d) learned. The matrix is a buffer, public and constant: it is saved with
        checkpoints but never sent in a model update (:meth:`SASRec.shareable_state`).
    item_features_side
        Where the catalogue features enter: ``"both"`` (input vectors and scores, above) or
        ``"input"`` (input vectors only: items are scored by their id embeddings alone, so the
        ranking within a genre and period cannot lean on the feature part; ``W_out`` is absent).
    num_item_features
        F, the matrix's column count; set from the catalogue (``ExperimentConfig.model_config``).
    item_dim
        r, the width of the item table (0: ``d_model``, one d-dimensional vector per item). With
        ``0 < r < d_model`` the table is factorised (ALBERT's factorised embedding, Lan et al. 2020):
        items are r-dimensional, an input item vector is ``W_in e_i`` (d x r) and an item's score is
        ``(W_out h) . e_i`` (r x d), both tied to the one table. The table holds most of the weights
        (3,417 items x 48 against ~31k for the two blocks at d 48), so under DP-SGD, where every
        weight gets its own noise, a narrower table lowers the noise in each step while the encoder
        keeps its width. Measured on ML-1M's regions at epsilon 8 (r 32, d 48: benchmarks/RESULTS.md)
        it learned far more slowly than the full table; off by default.
    item_bias
        Add a learned bias per item to its score (``loss="ce"`` only): a popularity term of
        num_items weights that every user's gradient trains, next to the item vectors.
    transitions
        Score items also by a released item-transition table (``privacy/transitions.py``): the
        model holds a ``(num_items + 1) x (num_items + 1)`` buffer ``transition_table`` (row i: how
        often each item followed item i within ``transitions_window`` steps in the users' histories,
        as the federation released it once before training, with DP noise under DP-SGD), and a
        history's score for item j adds ``transitions_weight * sum_{m < transitions_history}
        transitions_recency**m * T[i_m, j]`` over its last items ``i_0`` (the most recent), ``i_1``, ...
        Training is unchanged (the table is not in the loss, nor in any update); the table is saved
        with checkpoints and sent to clients only for evaluation.
    transitions_window, transitions_decay
        What the table counts: pairs up to ``transitions_window`` steps apart, a pair k steps apart
        weighted ``transitions_decay ** (k - 1)``.
    transitions_weight, transitions_history, transitions_recency
        How the table scores (above).
    """

    num_items: int
    max_len: int = 200
    d_model: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.1
    ff_mult: int = 1
    block: str = "sasrec"
    positions: str = "from_start"
    init_std: float = 0.02
    loss: str = "ce"
    num_negatives: int = 256
    tie_weights: bool = True
    attn_init: str = "xavier"
    attn_output_dropout: bool = False
    item_features: str = ""
    item_features_side: str = "both"
    num_item_features: int = 0
    item_dim: int = 0
    item_bias: bool = False
    transitions: bool = False
    transitions_window: int = 5
    transitions_decay: float = 0.8
    transitions_weight: float = 0.4
    transitions_history: int = 10
    transitions_recency: float = 0.8

    @property
    def item_feature_names(self) -> tuple[str, ...]:
        """``item_features`` as a tuple of names."""
        return tuple(n.strip() for n in self.item_features.split(",") if n.strip())

    def __post_init__(self) -> None:
        checks = [
            ("num_items", self.num_items >= 1, ">= 1"),
            ("max_len", self.max_len >= 1, ">= 1"),
            ("d_model", self.d_model >= 1, ">= 1"),
            ("num_blocks", self.num_blocks >= 1, ">= 1"),
            ("num_heads", self.num_heads >= 1 and self.d_model % self.num_heads == 0,
             f"a divisor of d_model={self.d_model}"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("ff_mult", self.ff_mult >= 1, ">= 1"),
            ("block", self.block in ("sasrec", "pre_ln"), "'sasrec' or 'pre_ln'"),
            ("positions", self.positions in ("from_start", "from_end"), "'from_start' or 'from_end'"),
            ("init_std", self.init_std > 0, "> 0"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            ("num_negatives", self.num_negatives >= 1, ">= 1"),
            ("attn_init", self.attn_init in ("normal", "xavier"), "'normal' or 'xavier'"),
            ("item_features", isinstance(self.item_features, str)
             and all(n.strip() for n in self.item_features.split(",")) if self.item_features else True,
             "comma-separated catalogue feature names such as 'genres,year' (or '' for none)"),
            ("item_features_side", self.item_features_side in ("both", "input"), "'both' or 'input'"),
            ("num_item_features", isinstance(self.num_item_features, int) and self.num_item_features >= 0, ">= 0"),
            ("item_dim", isinstance(self.item_dim, int) and not isinstance(self.item_dim, bool)
             and 0 <= self.item_dim <= self.d_model,
             f"an integer in [0, d_model={self.d_model}] (0: the item table is d_model wide)"),
            ("item_bias", isinstance(self.item_bias, bool) and (not self.item_bias or self.loss == "ce"),
             f"false unless loss='ce' (got loss={self.loss!r}): the bias is part of the full-catalogue scores"),
            ("transitions", isinstance(self.transitions, bool), "true or false"),
            ("transitions_window", isinstance(self.transitions_window, int)
             and not isinstance(self.transitions_window, bool) and self.transitions_window >= 1, "an integer >= 1"),
            ("transitions_decay", 0 < self.transitions_decay <= 1, "in (0, 1]"),
            ("transitions_weight", 0 <= self.transitions_weight < math.inf, "a finite number >= 0"),
            ("transitions_history", isinstance(self.transitions_history, int)
             and not isinstance(self.transitions_history, bool) and self.transitions_history >= 1, "an integer >= 1"),
            ("transitions_recency", 0 < self.transitions_recency <= 1, "in (0, 1]"),
        ]
        check_fields(self, checks)

    @property
    def item_width(self) -> int:
        """The item table's width: ``item_dim``, or ``d_model`` when it is 0."""
        return self.item_dim or self.d_model

    @property
    def factorised_items(self) -> bool:
        """Whether item vectors are narrower than the encoder (``0 < item_dim < d_model``)."""
        return self.item_width < self.d_model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from ``nn.Linear`` layers (Opacus-compatible).

    Queries may come from a different tensor than keys and values (SASRec's block normalises the
    queries only).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, query: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = query.shape
        nh, hs = self.num_heads, C // self.num_heads
        q = self.q(query).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv(source).split(C, dim=2)  # 2 x (B, T, C)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class FeedForward(nn.Module):
    """Point-wise feed-forward network ``d -> ff_mult * d -> d`` with ReLU (SASRec: ff_mult = 1)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.ff_mult * config.d_model)
        self.fc2 = nn.Linear(config.ff_mult * config.d_model, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.relu(self.fc1(x)))))


class Block(nn.Module):
    """One Transformer block, SASRec's layout or pre-norm (see ``ModelConfig.block``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layout = config.block
        self.ln1 = nn.LayerNorm(config.d_model, eps=1e-8)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=1e-8)
        self.ff = FeedForward(config)
        self.drop = nn.Dropout(config.dropout) if config.attn_output_dropout else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.layout == "sasrec":
            q = self.ln1(x)
            x = q + self.drop(self.attn(q, x, mask))
            x = self.ln2(x)
            return x + self.ff(x)
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.ff(self.ln2(x))


class SASRec(nn.Module):
    """Causal Transformer over a user's item history; scores items by dot product.

    ``forward(inputs, targets=None, negatives=None) -> (logits, loss)``:

    * ``inputs`` (B, T) item indices, left-padded with 0; the last column is the most recent item.
    * Without ``targets``: logits (B, num_items) of the next item after each history (column
      ``i`` scores item ``i + 1``), loss ``None``.
    * With ``targets`` (B, T), the item that follows each input position (0 where there is none):
      the training loss, reduced per user then over users; logits ``None``.
    * ``negatives``: (B, num_negatives) catalogue items per user for ``loss="sampled"``;
      (B, T) one per position for ``loss="bce"``.

    ``packed`` (default True) computes output scores only at non-padded positions, which is
    faster but mixes users in one matrix; DP-SGD code sets it to False so that every layer sees
    one row per user (Opacus' per-sample gradients need that). Both give the same loss.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, r = config.d_model, config.item_width
        self.item_emb = nn.Embedding(config.num_items + 1, r, padding_idx=0)
        # a factorised table (item_dim < d_model): r-wide items, projected in and out of the encoder
        self.item_in = nn.Linear(r, d, bias=False) if config.factorised_items else None
        self.item_out = nn.Linear(d, r, bias=False) if config.factorised_items else None
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_blocks)])
        self.ln_f = nn.LayerNorm(d, eps=1e-8)
        # Output item vectors: the input embedding (tied) or a table of their own. Either way the
        # scoring Linear shares its Parameter with an Embedding at module level, so full scoring
        # (``output(h)``) and sampled scoring (``target_emb(ids)``) read the same vectors and
        # Opacus sees every use through a module call.
        self.target_emb = None if config.tie_weights else nn.Embedding(config.num_items + 1, r, padding_idx=0)
        self.output = nn.Linear(r, config.num_items + 1, bias=config.item_bias)
        self.output.weight = self._targets().weight
        if config.item_feature_names:
            if config.num_item_features < 1:
                raise ValueError(f"model.item_features={config.item_features!r} needs the catalogue's feature "
                                 "matrix: build the config with ExperimentConfig.model_config(num_items, "
                                 "num_item_features) (got num_item_features=0)")
            n_feat = config.num_item_features
            self.register_buffer("item_feature_matrix", torch.zeros(config.num_items + 1, n_feat))
            self.feat_in = nn.Linear(n_feat, d, bias=False)
            self.feat_out = nn.Linear(d, n_feat, bias=False) if config.item_features_side == "both" else None
        else:
            self.feat_in = self.feat_out = None
        if config.transitions:  # released once by the federation (privacy/transitions.py); zero until then
            self.register_buffer("transition_table", torch.zeros(config.num_items + 1, config.num_items + 1))
        else:
            self.transition_table = None
        self.packed = True
        self.apply(self._init_weights)
        if config.attn_init == "xavier":
            # nn.MultiheadAttention: xavier_uniform_ over the (3d, d) in-projection
            bound = math.sqrt(6.0 / (d + 3 * d))
            for block in self.blocks:
                for layer in (block.attn.q, block.attn.kv):
                    nn.init.uniform_(layer.weight, -bound, bound)
        if self.item_in is not None:
            # scale-preserving projections, so that a projected item vector starts at the scale of an
            # unfactorised one (std init_std) and W_out h at that of the layer-normed h
            nn.init.normal_(self.item_in.weight, std=1.0 / math.sqrt(r))
            nn.init.normal_(self.item_out.weight, std=1.0 / math.sqrt(d))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def _targets(self) -> nn.Embedding:
        return self.item_emb if self.target_emb is None else self.target_emb

    def set_item_features(self, matrix: torch.Tensor | Any) -> None:
        """Load the public catalogue feature matrix (num_items + 1, num_item_features); row 0 must be zero."""
        if self.feat_in is None:
            raise ValueError("this model has no model.item_features; it takes no feature matrix")
        m = self._shaped_like(self.item_feature_matrix, matrix, "item feature matrix",
                              f"(num_items + 1, num_item_features) for model.item_features={self.config.item_features!r}")
        if bool(m[0].abs().sum() > 0):
            raise ValueError("item feature matrix row 0 (the padding item) must be zero")
        with torch.no_grad():
            self.item_feature_matrix.copy_(m.to(self.item_feature_matrix.device))

    @staticmethod
    def _shaped_like(buffer: torch.Tensor, value: torch.Tensor | Any, what: str, shape_note: str) -> torch.Tensor:
        """``value`` as float32, or a ``ValueError`` naming ``what`` when its shape is not ``buffer``'s."""
        t = torch.as_tensor(value, dtype=torch.float32)
        if tuple(t.shape) != tuple(buffer.shape):
            raise ValueError(f"{what} has shape {tuple(t.shape)}, this model expects {tuple(buffer.shape)} {shape_note}")
        return t

    def set_transition_table(self, table: torch.Tensor | Any) -> None:
        """Load the released transition table (num_items + 1, num_items + 1), finite, row and column 0 zero."""
        if self.transition_table is None:
            raise ValueError("this model has no model.transitions; it takes no transition table")
        t = self._shaped_like(self.transition_table, table, "transition table", "(num_items + 1 squared)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("transition table has non-finite entries")
        if bool(t[0].abs().sum() > 0) or bool(t[:, 0].abs().sum() > 0):
            raise ValueError("transition table row and column 0 (the padding item) must be zero")
        with torch.no_grad():
            self.transition_table.copy_(t.to(self.transition_table.device))

    def transition_scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) histories -> (B, V + 1): the recency-weighted table rows of each history's last
        ``transitions_history`` items (padding rows are zero)."""
        k = min(self.config.transitions_history, inputs.shape[1])
        last = inputs[:, -k:]  # (B, k), the most recent last
        weights = self.config.transitions_recency ** torch.arange(k - 1, -1, -1, device=inputs.device,
                                                                   dtype=self.transition_table.dtype)  # (k,)
        return torch.einsum("bkv,k->bv", self.transition_table[last], weights)  # (B, V + 1)

    def shareable_state(self) -> dict[str, torch.Tensor]:
        """The state dict with each tied tensor once (``output.weight`` is ``item_emb.weight``), float32, CPU.

        This is what travels between clients and server; :meth:`load_shareable_state` restores it.
        The public catalogue feature matrix is not in it (every party builds it from the catalogue),
        nor the transition table (released once; updates never carry it).
        """
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in self.state_dict().items():
            if name in ("item_feature_matrix", "transition_table"):
                continue
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().to("cpu", torch.float32).clone()
        return out

    def load_shareable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`shareable_state`; a missing or unexpected key is an error naming it."""
        expected = set(self.shareable_state())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"model state does not match this model: missing {missing}, unexpected {unexpected}")
        own = self.state_dict()
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(f"model state {name!r} has shape {tuple(tensor.shape)}, "
                                 f"this model expects {tuple(own[name].shape)}")
        self.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Hidden state after every position: (B, T) -> (B, T, d)."""
        B, T = inputs.shape
        if T > self.config.max_len:
            inputs = inputs[:, -self.config.max_len:]
            T = self.config.max_len
        real = inputs > 0  # (B, T)
        if self.config.positions == "from_end":
            pos = torch.arange(T - 1, -1, -1, device=inputs.device).expand(B, T).contiguous()  # (B, T)
        else:
            pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T) k-th real item -> k
        x = self.item_emb(inputs)  # (B, T, r)
        if self.item_in is not None:
            x = self.item_in(x)  # (B, T, d)
        if self.feat_in is not None:
            x = x + self.feat_in(self.item_feature_matrix[inputs])  # (B, T, d)
        x = x * math.sqrt(self.config.d_model) + self.pos_emb(pos)  # (B, T, d)
        x = self.emb_drop(x) * real.unsqueeze(-1)  # (B, T, d)
        causal = torch.ones(T, T, dtype=torch.bool, device=inputs.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=inputs.device)  # (T, T)
        # a padded query attends to itself only, so no row of the mask is empty
        mask = (causal & real.unsqueeze(1)) | eye  # (B, T, T)
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)  # (B, T, d)
        return self.ln_f(x)  # (B, T, d)

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h = self.encode(inputs)  # (B, T, d)
        if targets is None:
            logits = self.item_logits(h[:, -1, :])  # (B, V + 1)
            if self.transition_table is not None and self.config.transitions_weight:
                logits = logits + self.config.transitions_weight * self.transition_scores(inputs).to(logits.dtype)
            return logits[:, 1:], None  # (B, V)
        if targets.shape != h.shape[:2]:
            targets = targets[:, -h.shape[1]:]
        valid = targets > 0  # (B, T)
        if self.config.loss == "ce":
            loss = self._ce_loss(h, targets, valid)
        elif self.config.loss == "sampled":
            loss = self._sampled_loss(h, targets, valid, negatives)
        else:
            loss = self._bce_loss(h, targets, valid, negatives)
        return None, loss

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d) from :meth:`encode` -> every item's score (..., V + 1), column 0 the
        padding item; the catalogue-feature part included."""
        logits = self.output(self._to_item_space(h))
        if self.feat_out is not None:
            logits = logits + self.feat_out(h).to(logits.dtype) @ self.item_feature_matrix.T.to(logits.dtype)
        return logits

    def _to_item_space(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., r): ``W_out h`` for a factorised item table, ``h`` itself otherwise."""
        return h if self.item_out is None else self.item_out(h)

    def _item_vectors_scores(self, h: torch.Tensor, ids: torch.Tensor, einsum: str) -> torch.Tensor:
        """Scores of ``ids`` against ``h`` with ``einsum`` ("btd,btd->bt" or "btd,bkd->btk")."""
        scores = torch.einsum(einsum, self._to_item_space(h), self._targets()(ids))
        if self.feat_out is not None:
            scores = scores + torch.einsum(einsum.replace("d", "f"), self.feat_out(h), self.item_feature_matrix[ids])
        return scores

    @staticmethod
    def _per_user_mean(per_position: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) position losses -> scalar: mean over each user's valid positions, then users."""
        counts = valid.sum(dim=1).clamp(min=1)  # (B,)
        per_user = (per_position * valid).sum(dim=1) / counts  # (B,)
        return per_user.mean()

    def _ce_loss(self, h: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        # Softmax over the V + 1 output columns: column 0 (the padding row of the tied table) is a
        # class that is never a target, so training only pushes its logit down; scoring drops it.
        # It is not sliced away here: slicing makes the (N, V) tensor non-contiguous and costs a
        # third of the step on CPU.
        if self.packed:
            rows = valid.nonzero(as_tuple=True)
            logits = self.item_logits(h[rows]).float()  # (N, V + 1)
            ce = F.cross_entropy(logits, targets[rows], reduction="none")  # (N,)
            weight = 1.0 / valid.sum(dim=1).clamp(min=1).to(ce.dtype)  # (B,)
            return (ce * weight[rows[0]]).sum() / B
        logits = self.item_logits(h).float()  # (B, T, V + 1)
        ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), reduction="none").view(B, T)
        return self._per_user_mean(ce, valid)

    def _sampled_loss(
        self, h: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, negatives: torch.Tensor | None
    ) -> torch.Tensor:
        if negatives is None or negatives.dim() != 2 or negatives.shape[0] != h.shape[0]:
            raise ValueError("loss='sampled' needs negatives of shape (B, num_negatives)")
        pos = self._item_vectors_scores(h, targets, "btd,btd->bt").unsqueeze(-1)  # (B, T, 1)
        neg = self._item_vectors_scores(h, negatives, "btd,bkd->btk")  # (B, T, K)
        hit = negatives.unsqueeze(1) == targets.unsqueeze(-1)  # (B, T, K): a negative equal to the target
        neg = neg.masked_fill(hit, float("-inf"))
        logits = torch.cat([pos, neg], dim=-1)  # (B, T, 1 + K)
        ce = -F.log_softmax(logits, dim=-1)[..., 0]  # (B, T)
        return self._per_user_mean(ce, valid)

    def _bce_loss(
        self, h: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, negatives: torch.Tensor | None
    ) -> torch.Tensor:
        if negatives is None or negatives.shape != targets.shape:
            raise ValueError("loss='bce' needs negatives of shape (B, T), one per position")
        pos = self._item_vectors_scores(h, targets, "btd,btd->bt")  # (B, T)
        neg = self._item_vectors_scores(h, negatives, "btd,btd->bt")  # (B, T)
        bce = F.softplus(-pos) + F.softplus(neg)  # -log sigmoid(pos) - log(1 - sigmoid(neg))
        return self._per_user_mean(bce, valid)

    @torch.no_grad()
    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """Scores of every item after each history: (B, T) -> (B, num_items), column i = item i+1."""
        logits, _ = self(inputs)
        return logits
