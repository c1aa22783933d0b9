"""Public catalogue features (``model.item_features``): the matrix, its errors, the model's use of it."""

import numpy as np
import pytest
import torch

from core_model.config import load_config
from core_model.features import build_model, catalogue_features
from core_model.model import ModelConfig, SASRec

CATALOGUE = {
    "genres": ["", "Action|Comedy", "Drama", "", "Comedy|Comedy"],
    "year": ["", "1993", "1995", "2001", ""],
    "title": ["", "A (1993)", "B (1995)", "C (2001)", "D"],
}


def test_matrix_by_hand():
    f = catalogue_features(CATALOGUE, ["genres", "year/5"], 4)
    assert f.columns == ("genres=Action", "genres=Comedy", "genres=Drama",
                         "year/5=1990", "year/5=1995", "year/5=2000")
    expected = np.array([
        [0, 0, 0, 0, 0, 0],        # padding
        [0.5, 0.5, 0, 1, 0, 0],    # two genres share a genre's weight; 1993 -> 1990
        [0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],        # no genre: nothing from that feature
        [0, 1, 0, 0, 0, 0],        # a repeated token counts once; no year
    ], dtype=np.float32)
    np.testing.assert_allclose(f.matrix, expected)


def test_plain_categorical_year_has_one_column_per_value():
    f = catalogue_features(CATALOGUE, ["year"], 4)
    assert f.columns == ("year=1993", "year=1995", "year=2001")


@pytest.mark.parametrize("names,needle", [
    (["colour"], "'colour', which this catalogue does not have; it has ['genres', 'title', 'year']"),
    (["genres", "genres"], "names ['genres'] more than once"),
    ([], "model.item_features is empty"),
    (["title/5"], "'title/5' buckets integers, but item 1's 'title' is 'A (1993)'"),
    (["year/x"], "'year/x': expected 'feature/width' with a whole width >= 1"),
    (["year/0"], "'year/0': expected 'feature/width'"),
])
def test_bad_feature_names_are_clear_errors(names, needle):
    with pytest.raises(ValueError) as err:
        catalogue_features(CATALOGUE, names, 4)
    assert needle in str(err.value)


def test_wrong_length_and_all_empty_are_errors():
    with pytest.raises(ValueError, match=r"'genres' has 4 entries, expected num_items \+ 1 = 5"):
        catalogue_features({"genres": ["", "A", "B", "C"]}, ["genres"], 4)
    with pytest.raises(ValueError, match="no item has a value"):
        catalogue_features({"genres": ["", "", "", "", ""]}, ["genres"], 4)


def _model(features="genres,year/5"):
    cfg = load_config(None, [f'model.item_features="{features}"', "model.d_model=8", "model.max_len=6",
                             "model.dropout=0.0"])
    torch.manual_seed(0)
    return build_model(cfg, 4, CATALOGUE)


def test_features_change_the_scores_through_both_projections():
    model = _model().eval()
    history = torch.tensor([[0, 0, 1, 2]])
    base = model.score(history)
    with torch.no_grad():
        model.feat_out.weight.zero_()  # the output side off: scores change
    no_out = model.score(history)
    assert not torch.allclose(base, no_out)
    with torch.no_grad():
        model.feat_in.weight.zero_()  # the input side off too: a plain SASRec of the same weights
    plain = SASRec(ModelConfig.from_dict({**model.config.to_dict(), "item_features": "", "num_item_features": 0}))
    plain.load_shareable_state({k: v for k, v in model.shareable_state().items() if not k.startswith("feat_")})
    assert not torch.allclose(no_out, model.score(history))
    torch.testing.assert_close(model.score(history), plain.eval().score(history))


def test_input_side_only_scores_items_by_their_id_embeddings():
    cfg = load_config(None, ['model.item_features="genres,year/5"', 'model.item_features_side="input"',
                             "model.d_model=8", "model.max_len=6", "model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, 4, CATALOGUE).eval()
    assert model.feat_out is None and set(k for k in model.shareable_state() if k.startswith("feat_")) == {
        "feat_in.weight"}
    history = torch.tensor([[0, 0, 1, 2]])
    plain = SASRec(ModelConfig.from_dict({**model.config.to_dict(), "item_features": "", "num_item_features": 0}))
    plain.load_shareable_state({k: v for k, v in model.shareable_state().items() if not k.startswith("feat_")})
    assert not torch.allclose(model.score(history), plain.eval().score(history))  # the input side counts
    with torch.no_grad():
        model.feat_in.weight.zero_()
    torch.testing.assert_close(model.score(history), plain.score(history))
    with pytest.raises(ValueError, match=r"item_features_side must be 'both' or 'input', got 'output'"):
        load_config(None, ['model.item_features_side="output"'])


def test_matrix_is_saved_with_the_model_but_never_shared():
    model = _model()
    assert "item_feature_matrix" in model.state_dict()
    shared = model.shareable_state()
    assert "item_feature_matrix" not in shared and {"feat_in.weight", "feat_out.weight"} <= set(shared)
    other = _model()
    other.load_shareable_state(shared)  # keeps its own (identical, public) matrix
    torch.testing.assert_close(other.item_feature_matrix, model.item_feature_matrix)


def test_checkpoint_round_trip_keeps_the_matrix(tmp_path):
    from core_model.train import load_checkpoint, save_checkpoint
    model = _model().eval()
    save_checkpoint(tmp_path / "m.pt", model, extra={})
    again, _ = load_checkpoint(tmp_path / "m.pt")
    history = torch.tensor([[0, 1, 2, 3]])
    torch.testing.assert_close(again.score(history), model.score(history))


def test_matrix_errors_name_the_problem():
    model = _model()
    with pytest.raises(ValueError, match=r"shape \(5, 2\), this model expects \(5, 6\)"):
        model.set_item_features(torch.zeros(5, 2))
    bad = torch.zeros(5, 6)
    bad[0, 1] = 1.0
    with pytest.raises(ValueError, match="row 0 \\(the padding item\\) must be zero"):
        model.set_item_features(bad)
    with pytest.raises(ValueError, match="has no model.item_features"):
        SASRec(ModelConfig(num_items=4)).set_item_features(torch.zeros(5, 6))
    with pytest.raises(ValueError, match="needs the catalogue's feature matrix"):
        SASRec(ModelConfig(num_items=4, item_features="genres"))
    cfg = load_config(None, ['model.item_features="genres"'])
    with pytest.raises(ValueError, match="needs the catalogue's item features, and none were given"):
        build_model(cfg, 4, None)
    with pytest.raises(ValueError, match="model.num_item_features is taken from the data"):
        load_config(None, ["model.num_item_features=3"])
    with pytest.raises(ValueError, match="item_features"):
        ModelConfig(num_items=4, item_features="genres,,year")


def test_client_needs_the_servers_feature_record():
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from client.client_app import ClientData, _model as client_model
    cfg = load_config(None, ['model.item_features="genres"', "model.d_model=8", "model.max_len=6"])
    state = _model("genres").shareable_state()
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({})})
    data = ClientData(split=None, num_items=4, name="c0")
    with pytest.raises(ValueError, match="no 'catalogue-features' record"):
        client_model(cfg, data, content)
    matrix = catalogue_features(CATALOGUE, ["genres"], 4).matrix
    content["catalogue-features"] = ArrayRecord({"matrix": torch.from_numpy(matrix)})
    model = client_model(cfg, data, content)
    np.testing.assert_allclose(model.item_feature_matrix.numpy(), matrix)
