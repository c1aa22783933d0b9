"""SASRec encoder: causality, padding, losses on tiny tensors (B=2, T=5, 11 items)."""

import math

import pytest
import torch
import torch.nn.functional as F

from core_model.model import ModelConfig, SASRec


def make(loss="ce", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=11, max_len=5, d_model=8, num_blocks=2, num_heads=2, dropout=0.0,
                      loss=loss, num_negatives=4, **kw)
    return SASRec(cfg).eval()


INPUTS = torch.tensor([[0, 3, 4, 5, 6], [1, 2, 9, 10, 11]])  # (2, 5), user 0 left-padded
TARGETS = torch.tensor([[0, 4, 5, 6, 7], [2, 9, 10, 11, 3]])


VARIANTS = [dict(block=b, positions=p) for b in ("sasrec", "pre_ln") for p in ("from_start", "from_end")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_future_items_never_changes_earlier_outputs(variant):
    model = make(**variant)
    h = model.encode(INPUTS)
    for t in range(5):
        changed = INPUTS.clone()
        changed[:, t:] = torch.tensor([7, 8, 1, 2, 3])[t:]
        h2 = model.encode(changed)
        assert torch.allclose(h[:, :t], h2[:, :t], atol=1e-6), f"position < {t} saw the future"
        if t < 4:
            assert not torch.allclose(h[:, t:], h2[:, t:]), "the change had no effect at all"


@pytest.mark.parametrize("variant", VARIANTS)
def test_extra_left_padding_does_not_change_outputs(variant):
    model = make(**variant)
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[0, 0, 3, 4, 5]])
    assert torch.allclose(model.encode(short)[:, -3:], model.encode(padded)[:, -3:], atol=1e-6)
    logits_short, _ = model(short)
    logits_padded, _ = model(padded)
    assert torch.allclose(logits_short, logits_padded, atol=1e-6)


def test_inference_scores_every_item_once():
    logits, loss = make()(INPUTS)
    assert loss is None and logits.shape == (2, 11)


def test_ce_loss_is_mean_over_positions_then_users():
    model = make()
    _, loss = model(INPUTS, TARGETS)
    h = model.encode(INPUTS)
    logits = h @ model.item_emb.weight.detach().T  # (2, 5, 12): column 0 is padding (logit 0)
    per_user = []
    for b in range(2):
        rows = [t for t in range(5) if TARGETS[b, t] > 0]
        per_user.append(sum(F.cross_entropy(logits[b, t], TARGETS[b, t]) for t in rows) / len(rows))
    assert torch.allclose(loss, (per_user[0] + per_user[1]) / 2, atol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "sampled", "bce"])
def test_packed_and_per_user_paths_give_the_same_loss(loss):
    model = make(loss)
    neg = torch.randint(1, 12, (2, 4) if loss == "sampled" else (2, 5), generator=torch.Generator().manual_seed(1))
    _, packed = model(INPUTS, TARGETS, neg)
    model.packed = False
    _, unpacked = model(INPUTS, TARGETS, neg)
    assert torch.allclose(packed, unpacked, atol=1e-6)


def test_sampled_loss_masks_a_negative_equal_to_the_target():
    model = make("sampled")
    targets = torch.tensor([[0, 0, 0, 0, 7], [0, 0, 0, 0, 3]])
    neg_clean = torch.tensor([[1, 2, 5, 8], [1, 2, 5, 8]])
    neg_hit = torch.tensor([[1, 2, 5, 7], [1, 2, 5, 3]])  # last negative is the target itself
    h = model.encode(INPUTS)[:, -1]  # (2, d)
    emb = model.item_emb.weight.detach()
    pos = (h * emb[targets[:, -1]]).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", h, emb[neg_hit[:, :3]])  # the clashing negative left out
    expect = -F.log_softmax(torch.cat([pos, neg], 1), 1)[:, 0]
    _, loss_hit = model(INPUTS, targets, neg_hit)
    _, loss_clean = model(INPUTS, targets, neg_clean)
    assert torch.allclose(loss_hit, expect.mean(), atol=1e-5)
    assert not torch.allclose(loss_hit, loss_clean)


def test_bce_loss_by_hand():
    model = make("bce")
    targets = torch.tensor([[0, 0, 0, 0, 7], [0, 0, 0, 2, 3]])
    neg = torch.tensor([[1, 1, 1, 1, 9], [1, 1, 1, 4, 5]])
    _, loss = model(INPUTS, targets, neg)
    h = model.encode(INPUTS)
    emb = model.item_emb.weight.detach()

    def term(b, t):
        p = (h[b, t] * emb[targets[b, t]]).sum()
        n = (h[b, t] * emb[neg[b, t]]).sum()
        return -torch.log(torch.sigmoid(p)) - torch.log(1 - torch.sigmoid(n))
    expect = (term(0, 4) + (term(1, 3) + term(1, 4)) / 2) / 2
    assert torch.allclose(loss, expect, atol=1e-5)


def test_missing_negatives_is_a_clear_error():
    with pytest.raises(ValueError, match="needs negatives"):
        make("sampled")(INPUTS, TARGETS)
    with pytest.raises(ValueError, match="one per position"):
        make("bce")(INPUTS, TARGETS, torch.ones(2, 3, dtype=torch.long))


def test_tied_output_shares_the_embedding_parameter():
    model = make()
    assert model.output.weight is model.item_emb.weight
    untied = make(tie_weights=False)
    assert untied.output.weight is not untied.item_emb.weight
    assert untied.output.weight is untied.target_emb.weight


def test_xavier_attention_init_matches_multihead_attention_and_leaves_the_rest_normal():
    normal, xavier = make(attn_init="normal"), make(attn_init="xavier")
    bound = math.sqrt(6.0 / (4 * 8))  # xavier_uniform_ over the stacked (3d, d) in-projection, d = 8
    for block in xavier.blocks:
        w = torch.cat([block.attn.q.weight, block.attn.kv.weight])  # (3d, d)
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)
        assert torch.equal(block.attn.q.bias, torch.zeros(8))
    for block in normal.blocks:
        assert block.attn.q.weight.std() < 0.04  # N(0, 0.02)
    # every other weight is drawn exactly as before (same seed, same order)
    same = [n for n, _ in normal.named_parameters() if ".attn.q." not in n and ".attn.kv." not in n]
    params_n, params_x = dict(normal.named_parameters()), dict(xavier.named_parameters())
    assert all(torch.equal(params_n[n], params_x[n]) for n in same)


def test_attention_output_dropout_can_be_switched_off():
    torch.manual_seed(0)
    cfg = dict(num_items=11, max_len=5, d_model=8, num_blocks=1, dropout=0.5)
    on = SASRec(ModelConfig(**cfg, attn_output_dropout=True)).train()
    off = SASRec(ModelConfig(**cfg, attn_output_dropout=False)).train()
    assert isinstance(on.blocks[0].drop, torch.nn.Dropout)
    assert isinstance(off.blocks[0].drop, torch.nn.Identity)
    x = torch.randn(2, 5, 8)
    assert torch.equal(off.blocks[0].drop(x), x)


def test_histories_longer_than_max_len_use_the_last_items():
    model = make()
    long = torch.tensor([[9, 9, 9, 3, 4, 5, 6, 7]])
    logits_long, _ = model(long)
    logits_cut, _ = model(long[:, -5:])
    assert torch.allclose(logits_long, logits_cut)


def test_a_factorised_item_table_is_narrow_tied_and_scores_through_the_projections():
    model = make(item_dim=3)
    assert model.item_emb.weight.shape == (12, 3) and model.output.weight is model.item_emb.weight
    assert model.item_in.weight.shape == (8, 3) and model.item_out.weight.shape == (3, 8)
    full = make()
    assert model.num_parameters() < full.num_parameters()
    h = model.encode(INPUTS)  # (2, 5, 8)
    by_hand = model.item_out(h) @ model.item_emb.weight.T  # (2, 5, 12)
    assert torch.allclose(model.item_logits(h), by_hand, atol=1e-6)
    logits, _ = model(INPUTS)
    assert torch.allclose(logits, by_hand[:, -1, 1:], atol=1e-6)
    # the input side reads W_in e_i: changing the projection changes the encoding
    with torch.no_grad():
        x0 = model.item_in(model.item_emb(INPUTS))
        assert torch.allclose(x0, model.item_emb.weight[INPUTS] @ model.item_in.weight.T, atol=1e-7)
        model.item_in.weight.mul_(2)
    assert not torch.allclose(model.encode(INPUTS), h)
    # a projected item vector starts at the scale of an unfactorised one (std init_std = 0.02)
    wide = SASRec(ModelConfig(num_items=2000, d_model=48, item_dim=24))
    vectors = wide.item_in(wide.item_emb.weight[1:]).detach()
    assert 0.015 < vectors.std().item() < 0.025
    # item_dim == d_model is the plain table
    assert make(item_dim=8).item_in is None and make(item_dim=8).num_parameters() == full.num_parameters()
    state = model.shareable_state()
    assert {"item_in.weight", "item_out.weight"} <= set(state) and "output.weight" not in state


def test_item_bias_adds_one_trained_term_per_item_to_the_scores():
    model = make(item_bias=True)
    assert model.output.bias.shape == (12,) and torch.equal(model.output.bias, torch.zeros(12))
    h = model.encode(INPUTS)
    with torch.no_grad():
        model.output.bias.copy_(torch.arange(12.0))
    by_hand = h @ model.item_emb.weight.T + torch.arange(12.0)
    assert torch.allclose(model.item_logits(h), by_hand, atol=1e-5)
    assert torch.allclose(model(INPUTS)[0], by_hand[:, -1, 1:], atol=1e-5)
    assert "output.bias" in model.shareable_state()
    _, loss = model(INPUTS, TARGETS)
    loss.backward()
    assert model.output.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="item_bias must be false unless loss='ce' \\(got loss='sampled'\\)"):
        make("sampled", item_bias=True)


@pytest.mark.parametrize("field,value,needle", [
    ("item_dim", 9, "item_dim must be an integer in [0, d_model=8] (0: the item table is d_model wide), got 9"),
    ("item_dim", -1, "item_dim must be an integer in [0, d_model=8]"),
    ("item_bias", 1, "item_bias must be false unless loss='ce'"),
    ("num_items", 0, "num_items must be >= 1, got 0"),
    ("num_heads", 3, "num_heads must be a divisor of d_model=8, got 3"),
    ("dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
    ("loss", "mse", "loss must be one of"),
    ("attn_init", "kaiming", "attn_init must be 'normal' or 'xavier', got 'kaiming'"),
])
def test_config_errors_name_parameter_and_value(field, value, needle):
    kw = dict(num_items=11, d_model=8)
    kw[field] = value
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**kw)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="unknown model config keys \\['hidden'\\]"):
        ModelConfig.from_dict({"num_items": 3, "hidden": 4})




def test_shareable_state_sends_tied_weights_once_and_round_trips():
    model = make()
    state = model.shareable_state()
    assert "item_emb.weight" in state and "output.weight" not in state
    other = make()
    for p in other.parameters():
        torch.nn.init.zeros_(p)
    other.load_shareable_state(state)
    assert other.output.weight is other.item_emb.weight
    assert torch.equal(other(INPUTS)[0], model(INPUTS)[0])


def test_loading_a_mismatched_state_names_the_problem():
    model = make()
    state = model.shareable_state()
    with pytest.raises(ValueError, match="missing \\['ln_f.bias'\\]"):
        model.load_shareable_state({k: v for k, v in state.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match="'item_emb.weight' has shape \\(13, 8\\), this model expects \\(12, 8\\)"):
        model.load_shareable_state({**state, "item_emb.weight": torch.zeros(13, 8)})


def test_transition_table_adds_recency_weighted_rows_of_the_last_items_to_the_scores():
    model = make(transitions=True, transitions_weight=0.5, transitions_history=3, transitions_recency=0.5)
    plain = make()
    table = torch.rand(12, 12)
    table[0], table[:, 0] = 0.0, 0.0
    model.set_transition_table(table)
    logits, _ = model(INPUTS)  # (2, 11)
    base, _ = plain(INPUTS)
    # user 0: last items 4, 5, 6 (6 the most recent); user 1: 9, 10, 11
    for b, (i2, i1, i0) in enumerate(([4, 5, 6], [9, 10, 11])):
        prior = table[i0] + 0.5 * table[i1] + 0.25 * table[i2]
        assert torch.allclose(logits[b], base[b] + 0.5 * prior[1:], atol=1e-5)
    # a padded position contributes its zero row
    short = torch.tensor([[0, 0, 0, 0, 7]])
    assert torch.allclose(model(short)[0], plain(short)[0] + 0.5 * table[7, 1:], atol=1e-5)
    # training is unchanged: the same loss with and without a table
    assert torch.equal(model(INPUTS, TARGETS)[1], plain(INPUTS, TARGETS)[1])


def test_transition_table_is_saved_but_never_shared_and_bad_tables_are_named(tmp_path):
    from core_model.train import load_checkpoint, save_checkpoint

    model = make(transitions=True)
    table = torch.zeros(12, 12)
    table[3, 4] = 2.5
    model.set_transition_table(table)
    assert "transition_table" not in model.shareable_state()
    model.load_shareable_state(model.shareable_state())  # an update leaves the table as it is
    assert model.transition_table[3, 4] == 2.5
    save_checkpoint(tmp_path / "m.pt", model, extra={})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.transition_table, table)
    with pytest.raises(ValueError, match=r"shape \(5, 5\), this model expects \(12, 12\)"):
        model.set_transition_table(torch.zeros(5, 5))
    bad = table.clone()
    bad[0, 2] = 1.0
    with pytest.raises(ValueError, match="row and column 0"):
        model.set_transition_table(bad)
    bad[0, 2], bad[1, 1] = 0.0, float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        model.set_transition_table(bad)
    with pytest.raises(ValueError, match="no model.transitions"):
        make().set_transition_table(table)


@pytest.mark.parametrize("field,value,needle", [
    ("transitions_window", 0, "transitions_window"), ("transitions_decay", 0.0, "transitions_decay"),
    ("transitions_weight", -1.0, "transitions_weight"), ("transitions_history", 0, "transitions_history"),
    ("transitions_recency", 1.5, "transitions_recency"), ("transitions", 1, "transitions")])
def test_transition_settings_are_checked(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(num_items=11, **{field: value})
