"""Reports of a run directory: the per-round plot and the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_rounds(run_dir: Path, out: Path | None = None) -> Path:
    """PNG of test NDCG@10 and training loss per round (recomputed from ``metrics.jsonl``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rounds(run_dir)
    out = Path(out or Path(run_dir) / "rounds.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ev = [r for r in rows if "test_ndcg@10" in r]
    ax1.plot([r["round"] for r in ev], [r["test_ndcg@10"] for r in ev], marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("NDCG@10 (clients' test targets, full ranking)")
    tr = [r for r in rows if "train_loss" in r]
    ax2.plot([r["round"] for r in tr], [r["train_loss"] for r in tr], marker="o", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("mean local training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
