"""How the transition table scores beside a trained model (``model.transitions``): the table alone,
the model alone, and the two together at several ``model.transitions_weight``, on the validation
and the test targets (leave-one-out, full ranking, history excluded).

    python benchmarks/transitions_prior.py --run-dir RUN [--release-sigma S] [--weights 0.1 0.2 0.4 0.8]

``RUN`` is a finished ``fedrec simulate`` run (its ``config.json`` and ``model.pt``). Without
``--release-sigma`` the table is the one in ``model.pt`` (a run with ``model.transitions``). With it,
the table is built here from the run's data as the federation would release it: every user's
clipped transition counts (``privacy/transitions.py``) summed, plus Gaussian noise of standard
deviation S, which is the distribution of the securely aggregated sum of the clients' noisy shares
(the shares are independent Gaussians whose variances add up to S^2). That lets one try a split of
a privacy budget on a model trained without a table; its privacy is that of a run which released
the table at S and trained the model at the run's own multiplier (compose both to state epsilon).

The weight is chosen on the validation targets; the test figure is reported at that weight.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core_model.config import build_config  # noqa: E402
from core_model.evaluate import evaluate_ranking  # noqa: E402
from core_model.model import SASRec  # noqa: E402
from core_model.train import load_checkpoint  # noqa: E402
from privacy.transitions import add_noise, client_transitions, finish_table  # noqa: E402
from simulations.clients import load_federation  # noqa: E402


def score(model: SASRec, split, which: str) -> dict[str, float]:
    inputs = split.valid_inputs() if which == "valid" else split.test_inputs()
    targets = split.valid_targets if which == "valid" else split.test_targets
    return evaluate_ranking(model.score, inputs, targets, num_items=split.num_items, max_len=model.config.max_len,
                            exclude_history=True, sampled=False)


class TableOnly:
    """Scores by the table alone (the model's ``transition_scores``)."""

    def __init__(self, model: SASRec) -> None:
        self.model = model

    @torch.no_grad()
    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.transition_scores(inputs)[:, 1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--release-sigma", type=float, default=None)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cfg = build_config(json.loads((args.run_dir / "config.json").read_text()))
    _, split, _ = load_federation(cfg)
    trained, _ = load_checkpoint(args.run_dir / "model.pt")
    mc = replace(trained.config, transitions=True)
    model = SASRec(mc).eval()
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in trained.state_dict().items()}}, strict=True)
    if args.release_sigma is not None:
        total = client_transitions(split.train, split.num_items, window=mc.transitions_window,
                                   decay=mc.transitions_decay)
        model.set_transition_table(finish_table(add_noise(total, args.release_sigma)))
        source = f"built here from the run's data, Gaussian noise of standard deviation {args.release_sigma:g}"
    elif trained.transition_table is not None:
        source = "the run's released table (model.pt)"
    else:
        raise SystemExit(f"{args.run_dir / 'model.pt'} has no transition table; give --release-sigma")
    out = {"run_dir": str(args.run_dir), "table": source, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["benchmarks/transitions_prior.py", *(argv if argv is not None else sys.argv[1:])]),
           "protocol": "leave-one-out, full ranking, history excluded", "rows": []}
    rows = [("table alone", None), ("model alone", 0.0), *((f"model + {w:g} x table", w) for w in args.weights)]
    for label, weight in rows:
        if weight is None:
            scorer = TableOnly(model)
            valid = evaluate_ranking(scorer.score, split.valid_inputs(), split.valid_targets,
                                     num_items=split.num_items, max_len=mc.max_len, exclude_history=True,
                                     sampled=False)
            test = evaluate_ranking(scorer.score, split.test_inputs(), split.test_targets, num_items=split.num_items,
                                    max_len=mc.max_len, exclude_history=True, sampled=False)
        else:
            model.config = replace(mc, transitions_weight=weight)
            valid, test = score(model, split, "valid"), score(model, split, "test")
        out["rows"].append({"scoring": label, "weight": weight, "valid": valid, "test": test})
        print(f"{label:>24}: valid NDCG@10 {valid['ndcg@10']:.4f} HR@10 {valid['hr@10']:.4f} | "
              f"test NDCG@10 {test['ndcg@10']:.4f} HR@10 {test['hr@10']:.4f}", flush=True)
    mixed = [r for r in out["rows"] if r["weight"]]
    best = max(mixed, key=lambda r: r["valid"]["ndcg@10"])
    out["chosen_on_validation"] = {"weight": best["weight"], "test": best["test"]}
    print(f"weight chosen on validation: {best['weight']:g} -> test NDCG@10 {best['test']['ndcg@10']:.4f} "
          f"HR@10 {best['test']['hr@10']:.4f} ({time.perf_counter() - t0:.0f} s; table: {source})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
