"""Trainer pieces on tiny data, and one short real training run on synthetic data."""

import json

import numpy as np
import pytest
import torch

from core_model.data import leave_one_out
from core_model.evaluate import Popularity, evaluate_ranking
from core_model.model import ModelConfig, SASRec
from core_model.synthetic import SyntheticConfig, generate_live_commerce
from core_model.train import (SequenceBatches, TrainConfig, fit, load_checkpoint, lr_factor, sample_negatives,
                              select_device)


def test_sequence_batches_shift_by_one_and_left_pad():
    b = SequenceBatches([np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7])], max_len=3)
    inputs, targets = b.batch(np.array([0, 1, 2]))
    assert inputs.tolist() == [[1, 2, 3], [0, 0, 5], [0, 0, 0]]
    assert targets.tolist() == [[2, 3, 4], [0, 0, 6], [0, 0, 0]]
    assert b.num_positions == 4
    short, _ = b.batch(np.array([1]))
    assert short.tolist() == [[5]]  # trimmed to the batch's longest sequence


def test_negatives_are_catalogue_items_and_never_the_positive():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(1, 4, (64, 20), generator=g)
    neg = sample_negatives(ModelConfig(num_items=3, loss="bce"), targets, g)
    assert neg.shape == targets.shape and (neg != targets).all() and neg.min() >= 1 and neg.max() <= 3
    neg = sample_negatives(ModelConfig(num_items=30, loss="sampled", num_negatives=7), targets, g)
    assert neg.shape == (64, 7) and neg.min() >= 1 and neg.max() <= 30
    assert sample_negatives(ModelConfig(num_items=3), targets, g) is None


def test_learning_rate_schedule():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    assert lr_factor(cfg, 1.0) == pytest.approx(0.5)
    assert lr_factor(cfg, 2.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 10.0) == pytest.approx(0.1)
    assert lr_factor(TrainConfig(schedule="constant", warmup_epochs=0), 7.3) == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


def test_training_learns_the_synthetic_structure_and_checkpoints(tmp_path):
    log = generate_live_commerce(SyntheticConfig(num_users=300, num_items=60, num_merchants=6,
                                                 min_length=8, max_length=20, seed=1))
    split = leave_one_out(log)
    model = SASRec(ModelConfig(num_items=log.num_items, max_len=20, d_model=32, dropout=0.1))
    cfg = TrainConfig(epochs=12, eval_every=4, lr=5e-3, batch_size=64, precision="fp32")
    result = fit(model, split, cfg, run_dir=tmp_path, checkpoint_extra={"items": log.items.to_dict()})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 13))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] - 0.3
    pop = evaluate_ranking(Popularity(split.train, split.num_items), split.valid_inputs(), split.valid_targets,
                           num_items=split.num_items, max_len=20, sampled=False)
    assert result["best"]["valid_ndcg@10"] > pop["ndcg@10"] + 0.05, (result["best"], pop)
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt")
    x = torch.tensor([[0, 3, 4, 5]])
    model.eval()
    assert torch.allclose(loaded.score(x), model.score(x))
    assert ckpt["items"]["ids"][:2] == list(log.items.ids[:2])


def test_load_checkpoint_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="is not a fedrec checkpoint"):
        load_checkpoint(other)


def test_length_buckets_cover_every_user_once_with_less_padding():
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, int(n) + 1) for n in rng.integers(2, 60, 500)]
    b = SequenceBatches(seqs, max_len=50)
    for bucketed in (False, True):
        rows = list(b.shuffled(32, np.random.default_rng(1), bucketed=bucketed))
        assert sorted(np.concatenate(rows).tolist()) == list(range(500))
    def padded(bucketed):
        return sum(len(r) * int(b.lengths[r].max()) for r in b.shuffled(32, np.random.default_rng(1), bucketed=bucketed))
    assert padded(True) < 0.75 * padded(False)
    first = [r.tolist() for r in b.shuffled(32, np.random.default_rng(2), bucketed=True)]
    again = [r.tolist() for r in b.shuffled(32, np.random.default_rng(2), bucketed=True)]
    other = [r.tolist() for r in b.shuffled(32, np.random.default_rng(3), bucketed=True)]
    assert first == again and first != other


def test_by_length_sampling_draws_users_in_proportion_to_their_positions():
    # two kinds of users: 100 with 4 positions, 100 with 40 positions
    seqs = [np.arange(1, 6)] * 100 + [np.arange(1, 42)] * 100
    b = SequenceBatches(seqs, max_len=50)
    counts = np.zeros(200)
    positions = []
    for seed in range(30):
        for bucketed in (False, True):
            rows = np.concatenate(list(b.shuffled(16, np.random.default_rng(seed), bucketed=bucketed, by_length=True)))
            np.add.at(counts, rows, 1)
            positions.append(int(b.lengths[rows].sum()))
    # a long user is drawn ~10x as often as a short one; an epoch has the positions of one full pass
    assert 8.5 < counts[100:].sum() / counts[:100].sum() < 11.5
    assert abs(np.mean(positions) / b.num_positions - 1) < 0.05
    with pytest.raises(ValueError, match="user_sampling"):
        TrainConfig(user_sampling="by-weight")


def _ema_run(tmp_path, ema: float, name: str):
    log = generate_live_commerce(SyntheticConfig(num_users=120, num_items=40, num_merchants=4,
                                                 min_length=6, max_length=12, seed=3))
    split = leave_one_out(log)
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=log.num_items, max_len=12, d_model=16, dropout=0.0))
    cfg = TrainConfig(epochs=3, eval_every=3, lr=5e-3, batch_size=32, precision="fp32", ema=ema, patience=5)
    evaluated = []

    def on_evaluate(m):  # the model validation saw is the one kept
        evaluated.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"seen": True}

    result = fit(model, split, cfg, run_dir=tmp_path / name, on_evaluate=on_evaluate)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["seen"] is True  # on_evaluate's dict is in the epoch's record
    return model, evaluated[-1], result


def test_ema_weights_are_validated_kept_and_saved(tmp_path):
    raw, raw_seen, _ = _ema_run(tmp_path, 0.0, "raw")
    tiny, tiny_seen, _ = _ema_run(tmp_path, 1e-9, "tiny")  # an average that forgets at once = the last weights
    avg, avg_seen, _ = _ema_run(tmp_path, 0.9, "avg")
    for name, value in raw.state_dict().items():
        torch.testing.assert_close(tiny.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(avg.state_dict()[name], avg_seen[name])  # kept = validated
    assert any(not torch.allclose(avg.state_dict()[n], v) for n, v in raw.state_dict().items())
    saved, _ = load_checkpoint(tmp_path / "avg" / "model.pt")
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, avg_seen[name])
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"ema must be in \[0, 1\) \(0: off\)"):
            TrainConfig(ema=bad)


def test_weight_ema_is_the_bias_corrected_weighted_mean_with_a_capped_window():
    from core_model.train import WeightEMA
    ws = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 4.0])]
    model = torch.nn.Linear(2, 1, bias=False)

    def run(decay, epochs, steps):
        ema = WeightEMA(model, decay, epochs=epochs)
        ema.start_epoch(steps)
        for w in ws:
            with torch.no_grad():
                model.weight.copy_(w.view(1, 2))
            ema.update(model)
        return ema.module.weight.view(2), ema.current

    avg, used = run(0.5, epochs=100, steps=100)  # the cap (1 - 5 / 10,000) does not bind
    assert used == 0.5
    # weights 0.5 ** (3 - i) -> 1/4, 1/2, 1, normalised by 7/4
    torch.testing.assert_close(avg, (ws[0] + 2 * ws[1] + 4 * ws[2]) / 7)
    avg, used = run(0.998, epochs=2, steps=5)  # a 10-step run: the window is capped at 2 steps
    assert used == pytest.approx(0.5)
    torch.testing.assert_close(avg, (ws[0] + 2 * ws[1] + 4 * ws[2]) / 7)
    # a 90-epoch ML-1M run (34 steps per epoch) leaves the decay at 0.998
    assert WeightEMA(model, 0.998, epochs=90).start_epoch(34) is None
    ema = WeightEMA(model, 0.998, epochs=90)
    ema.start_epoch(34)
    assert ema.current == 0.998
    with pytest.raises(ValueError, match=r"train.ema=1.0: expected a decay in \(0, 1\)"):
        WeightEMA(model, 1.0, epochs=1)


def test_windows_make_every_position_a_target_exactly_once():
    seqs = [np.arange(1, 12), np.arange(20, 24), np.array([30])]  # 10, 3 and 0 positions
    last = SequenceBatches(seqs, max_len=4)
    b = SequenceBatches(seqs, max_len=4, windows=True)
    assert last.num_positions == 4 + 3 and b.num_positions == 10 + 3
    assert b.owners.tolist() == [0, 0, 0, 1, 2] and b.num_users == 3
    inputs, targets = b.batch(np.arange(5))
    # user 0: targets 2..11 in windows [8..11], [4..7], [2, 3], each input the item before its target
    assert targets.tolist() == [[8, 9, 10, 11], [4, 5, 6, 7], [0, 0, 2, 3], [0, 21, 22, 23], [0, 0, 0, 0]]
    assert inputs.tolist() == [[7, 8, 9, 10], [3, 4, 5, 6], [0, 0, 1, 2], [0, 20, 21, 22], [0, 0, 0, 0]]
    assert b.batch(np.array([0]))[1].tolist() == last.batch(np.array([0]))[1].tolist()  # the last window is SASRec's
    with pytest.raises(ValueError, match="long_histories"):
        TrainConfig(long_histories="all")


def test_windows_are_refused_where_a_user_must_stay_one_example():
    from core_model.train import local_train
    from privacy.dp import DPPlan, dp_local_train

    model = SASRec(ModelConfig(num_items=9, max_len=4, d_model=8))
    seqs = [np.arange(1, 10)] * 4
    cfg = TrainConfig(long_histories="windows", precision="fp32")
    with pytest.raises(ValueError, match="long_histories='windows' is for centralized training only"):
        local_train(model, seqs, cfg, epochs=1, seed=0)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_epoch=2, max_grad_norm=1.0, delta=1e-5,
                  accountant="prv", num_users=4)
    with pytest.raises(ValueError, match="DP-SGD's unit of privacy is the user"):
        dp_local_train(model, seqs, cfg, plan, epochs=1)


def test_auto_long_histories_are_windows_centrally_and_one_row_per_user_elsewhere():
    from core_model.train import local_train, resolve_long_histories
    from privacy.dp import DPPlan, dp_local_train

    assert TrainConfig().long_histories == "auto"
    assert resolve_long_histories("auto", per_user=False) == "windows"
    assert resolve_long_histories("auto", per_user=True) == "last"
    assert resolve_long_histories("last", per_user=False) == "last"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_long_histories("all", per_user=False)
    log = generate_live_commerce(SyntheticConfig(num_users=20, num_items=15, num_merchants=2,
                                                 min_length=8, max_length=14, seed=1))
    split = leave_one_out(log)
    positions = [len(seq) - 1 for seq in split.train]
    assert max(positions) > 4  # some histories are longer than max_len
    cfg = TrainConfig(epochs=1, precision="fp32", ema=0.0, eval_every=1)
    model = SASRec(ModelConfig(num_items=log.num_items, max_len=4, d_model=8))
    assert fit(model, split, cfg)["positions_per_epoch"] == sum(positions)  # every position: windows
    last = TrainConfig(**{**cfg.to_dict(), "long_histories": "last"})
    assert fit(model, split, last)["positions_per_epoch"] == sum(min(m, 4) for m in positions)
    seqs = [np.arange(1, 10)] * 4
    assert local_train(model, seqs, cfg, epochs=1, seed=0)["users"] == 4  # one row per user
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_epoch=2, max_grad_norm=1.0, delta=1e-5,
                  accountant="prv", num_users=4)
    assert dp_local_train(model, seqs, cfg, plan, epochs=1)["steps"] == 2


def test_draw_windows_picks_one_window_per_user_in_proportion_to_its_positions():
    seqs = [np.arange(1, 12), np.arange(20, 24), np.array([30])]  # windows of 4, 4, 2 positions; 3; none
    b = SequenceBatches(seqs, max_len=4, windows=True)
    assert b.first_row.tolist() == [0, 3, 4] and b.row_count.tolist() == [3, 1, 1]
    rng = np.random.default_rng(0)
    draws = np.stack([b.draw_windows(np.array([0, 1, 2]), rng) for _ in range(20000)])
    assert set(draws[:, 1]) == {3} and set(draws[:, 2]) == {4}
    share = np.bincount(draws[:, 0], minlength=3) / len(draws)
    assert np.allclose(share, [0.4, 0.4, 0.2], atol=0.015)
    picked = b.select(b.draw_windows(np.array([2, 0]), rng))
    assert picked.owners.tolist() == [2, 0] and len(picked) == 2 and picked.row_count.tolist() == [1, 0, 1]
    last = SequenceBatches(seqs, max_len=4)  # one row per user: that row
    assert last.draw_windows(np.array([2, 0, 1]), rng).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"users must be in \[0, 3\), got 0..3"):
        b.draw_windows(np.array([0, 3]), rng)


def test_random_windows_are_for_per_user_trainers_and_reach_the_early_history(monkeypatch):
    from core_model.train import local_train, resolve_long_histories

    assert resolve_long_histories("random", per_user=True) == "random"
    with pytest.raises(ValueError, match="long_histories='random' is for trainers whose example is the user"):
        resolve_long_histories("random", per_user=False)
    seqs = [np.concatenate([np.full(4, 1 + u), np.full(5, 5 + u)]) for u in range(3)]  # 2 windows of 4
    seen = []
    original = SequenceBatches.batch
    monkeypatch.setattr(SequenceBatches, "batch",
                        lambda self, rows: seen.append(original(self, rows)[1]) or original(self, rows))
    for mode, early in (("last", False), ("random", True)):
        seen.clear()
        model = SASRec(ModelConfig(num_items=9, max_len=4, d_model=8, num_blocks=1))
        cfg = TrainConfig(long_histories=mode, precision="fp32", batch_size=3)
        stats = local_train(model, seqs, cfg, epochs=12, seed=0)
        assert stats["users"] == 3
        targets = torch.cat([t.flatten() for t in seen])
        assert bool(((targets >= 1) & (targets <= 3)).any()) == early  # items 1-3 only in the first window
