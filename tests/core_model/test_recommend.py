"""recommend(history, k) from a saved model."""

import pytest
import torch

from core_model.data import Vocabulary
from core_model.model import ModelConfig, SASRec
from core_model.recommend import Recommender
from core_model.train import save_checkpoint


@pytest.fixture
def rec(tmp_path):
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=6, max_len=4, d_model=8, dropout=0.0))
    items = Vocabulary(("a", "b", "c", "d", "e", "f"), offset=1)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, extra={"items": items.to_dict(), "item_titles": ["", "A", "B", "C", "D", "E", "F"]})
    return Recommender.from_checkpoint(path, device="cpu"), model


def test_recommend_returns_the_top_scored_unseen_items(rec):
    recommender, model = rec
    out = recommender.recommend(["a", "c"], k=3)
    scores = model.eval().score(torch.tensor([[1, 3]]))[0]
    scores[[0, 2]] = float("-inf")
    best = torch.topk(scores, 3).indices + 1
    assert [r.item for r in out] == [recommender.items.raw(int(i)) for i in best]
    assert out[0].title == recommender.titles[int(best[0])]
    assert {"a", "c"}.isdisjoint(r.item for r in out)


def test_k_larger_than_unseen_catalogue_is_capped(rec):
    assert len(rec[0].recommend(["a", "b"], k=50)) == 4
    assert len(rec[0].recommend(["a", "b"], k=50, exclude_history=False)) == 6


@pytest.mark.parametrize("history,k,needle", [
    (["a", "zz"], 3, "history item 'zz' at position 1 is not in the model's catalogue"),
    ([], 3, "history is empty"),
    (["a"], 0, "k must be >= 1, got 0"),
])
def test_bad_requests(rec, history, k, needle):
    with pytest.raises(ValueError, match=needle):
        rec[0].recommend(history, k=k)
