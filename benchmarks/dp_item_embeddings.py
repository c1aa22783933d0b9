"""Where a DP model's item embeddings carry signal: norms by item popularity, and whether rare items
crowd the top of the rankings.

    python benchmarks/dp_item_embeddings.py --run-dir /tmp/x4/q2

Reads the run's ``config.json`` and ``model.pt`` (a ``fedrec simulate`` or ``benchmarks/federated.py``
run directory) and its data, counts each item's training interactions, and prints: the median norm of
the item embeddings in bands of that count; the share of the top-10 slots (first ``--users`` test
histories) that go to items seen fewer than 20 / 100 / 300 times; and validation NDCG@10 / HR@10 as
is, with items seen fewer than ``c`` times masked out of the ranking, and with their embeddings also
replaced by the mean of the others. For a model with ``model.item_features`` it also prints how
large the catalogue-feature part of the item vectors is and validation with that part taken out of
the score. The counts use the training data and serve this diagnosis only; nothing here is released
by a client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core_model.evaluate import metrics_from_ranks, pad_histories, rank_targets  # noqa: E402
from core_model.train import load_checkpoint  # noqa: E402
from simulations.clients import load_federation  # noqa: E402
from simulations.runner import load_run_config  # noqa: E402

BANDS = ((1, 20), (20, 100), (100, 500), (500, None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--users", type=int, default=1000, help="test histories for the top-10 shares")
    parser.add_argument("--rare", type=int, nargs="+", default=[20, 100, 200, 400], help="thresholds c")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_run_config(args.run_dir)
    model, _ = load_checkpoint(args.run_dir / "model.pt")
    model.eval()
    _, split, _ = load_federation(cfg)
    V, L = model.config.num_items, model.config.max_len
    counts = np.zeros(V + 1)
    for seq in split.train:
        np.add.at(counts, seq, 1)
    counts = counts[1:]  # column i = item i + 1, as in the scores
    weights = model.item_emb.weight.detach().clone()
    norms = weights[1:].norm(dim=1).numpy()
    for lo, hi in BANDS:
        band = (counts >= lo) & (counts < (hi or np.inf))
        print(f"items seen {lo}-{hi - 1 if hi else 'more'} times: {band.sum()}, median embedding norm "
              f"{np.median(norms[band]):.3f}")
    top = model.score(pad_histories(split.test_inputs()[:args.users], L)).topk(10, dim=1).indices.numpy()
    print("share of top-10 slots for items seen fewer than 20 / 100 / 300 times: "
          + " / ".join(f"{np.mean(counts[top] < c):.4f}" for c in (20, 100, 300)))

    def valid(scorer):
        m = metrics_from_ranks(rank_targets(scorer, split.valid_inputs(), split.valid_targets, num_items=V, max_len=L))
        return f"NDCG@10 {m['ndcg@10']:.4f} HR@10 {m['hr@10']:.4f}"

    print(f"validation as is: {valid(model.score)}")
    if model.feat_out is not None:  # model.item_features: how much of the score the catalogue part carries
        side = (model.item_feature_matrix @ model.feat_out.weight)[1:].norm(dim=1)  # (V,) feature vector norms
        print(f"catalogue features ({model.config.item_features}): median norm of an item's output-side feature "
              f"vector {side.median():.3f} (id embedding: {np.median(norms):.3f}); projection norms in "
              f"{model.feat_in.weight.norm():.2f}, out {model.feat_out.weight.norm():.2f}")
        saved = model.feat_out.weight.detach().clone()
        with torch.no_grad():
            model.feat_out.weight.zero_()
        print(f"validation with the output-side features off (id embeddings only in the score): {valid(model.score)}")
        with torch.no_grad():
            model.feat_out.weight.copy_(saved)
    for c in args.rare:
        rare = torch.from_numpy(counts < c)

        def masked(inputs, rare=rare):
            return model.score(inputs).masked_fill(rare[None, :], float("-inf"))

        as_is = valid(masked)
        with torch.no_grad():
            model.item_emb.weight[1:][rare] = weights[1:][~rare].mean(0)
        replaced = valid(masked)
        with torch.no_grad():
            model.item_emb.weight.copy_(weights)
        print(f"items seen fewer than {c} times ({int(rare.sum())}): masked out {as_is}; "
              f"also their embeddings set to the mean of the others {replaced}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
