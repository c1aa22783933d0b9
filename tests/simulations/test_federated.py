"""Real Flower simulations (Ray engine) on tiny synthetic data.

* 3 clients x 2 rounds: the loss falls, every client succeeds, and the global model equals the
  weighted mean of the clients' updates recomputed by hand (outside Flower) from the same seeds.
* Resume: a run killed with SIGKILL mid-run and resumed finishes every round exactly once and ends
  with the same model as an uninterrupted run, its moving average of the rounds' models
  (``federation.server_ema``) included; the average served in ``model.pt`` is the bias-corrected
  weighted mean of the rounds' models recomputed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr.app import ConfigRecord

from client.client_app import client_seed, round_lr
from core_model.config import load_config
from core_model.model import SASRec
from core_model.train import load_checkpoint, local_train
from server.server_app import client_lr, server_lr
from simulations.clients import load_federation
from simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=150", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=0.005", "eval.sampled=false", "federation.partition=iid", "federation.num_clients=3"]


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_hand(cfg, num_rounds: int, *, weighted: bool = True) -> dict[str, torch.Tensor]:
    """FedAvg recomputed without Flower: the same initial model, local training and seeds."""
    log, split, partition = load_federation(cfg)
    torch.manual_seed(cfg.federation.seed)
    global_model = SASRec(cfg.model_config(log.num_items))
    state = global_model.shareable_state()
    for rnd in range(1, num_rounds + 1):
        updates, weights = [], []
        for cid in range(partition.num_clients):
            model = SASRec(cfg.model_config(log.num_items))
            model.load_shareable_state(state)
            client_split = split.subset(partition.rows[cid])
            local_train(model, client_split.train, replace(cfg.train, lr=client_lr(cfg, rnd)),
                        epochs=cfg.federation.local_epochs,
                        seed=client_seed(cfg.federation.seed, rnd, partition.names[cid]))
            updates.append(model.shareable_state())
            weights.append(len(client_split) if weighted else 1)
        w = np.array(weights, dtype=np.float64) / sum(weights)
        state = {k: sum(float(wi) * u[k].double() for wi, u in zip(w, updates)).float() for k in state}
    return state


def test_three_clients_two_rounds_loss_falls_and_aggregate_is_the_weighted_mean(tmp_path):
    # unequal clients, so that a weighted and an unweighted mean differ
    cfg = load_config(None, [*TINY, "federation.num_rounds=2", "federation.partition=dirichlet-size",
                             "federation.dirichlet_alpha=1.0"])
    sizes = load_federation(cfg)[2].sizes()
    assert len(set(sizes.tolist())) == 3, sizes
    results = simulate(cfg, tmp_path)
    rows = rounds(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in rows)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[0]["users_trained"] == 150
    assert [r["lr"] for r in rows] == pytest.approx([0.005, 0.0005])  # cosine over the rounds, to 10 %
    assert (tmp_path / "rounds.png").stat().st_size > 0 and results["rounds"] == 2

    torch.set_num_threads(1)  # the simulated clients train single-threaded
    expected = by_hand(cfg, 2)
    got = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
    unweighted = by_hand(cfg, 2, weighted=False)
    assert any(not torch.allclose(got[n], unweighted[n], atol=1e-5, rtol=1e-4) for n in expected)


def test_client_lr_schedule_over_rounds():
    cfg = load_config(None, ["train.lr=0.002", "federation.num_rounds=5"])
    lrs = [client_lr(cfg, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.002) and lrs[-1] == pytest.approx(0.0002)
    assert lrs[2] == pytest.approx(0.0011)  # half-way: the mean of the two ends
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    flat = load_config(None, ["train.lr=0.002", "federation.num_rounds=5", "federation.lr_schedule=\"constant\""])
    assert {client_lr(flat, r) for r in range(1, 6)} == {0.002}
    assert client_lr(load_config(None, ["federation.num_rounds=1"]), 1) == cfg.train.lr
    with pytest.raises(ValueError, match="federation.lr_schedule"):
        load_config(None, ['federation.lr_schedule="linear"'])


def test_server_lr_schedule_over_rounds():
    cfg = load_config(None, ["federation.server_lr=0.02", "federation.num_rounds=5",
                             'federation.server_lr_schedule="cosine"'])
    lrs = [server_lr(cfg, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.02) and lrs[2] == pytest.approx(0.011) and lrs[-1] == pytest.approx(0.002)
    flat = load_config(None, ["federation.server_lr=0.02", "federation.num_rounds=5"])  # the default: constant
    assert {server_lr(flat, r) for r in range(1, 6)} == {0.02}
    with pytest.raises(ValueError, match="federation.server_lr_schedule must be 'constant' or 'cosine'"):
        load_config(None, ['federation.server_lr_schedule="step"'])
    to_zero = load_config(None, ["federation.server_lr=0.02", "federation.num_rounds=5",
                                 'federation.server_lr_schedule="cosine"', "federation.server_lr_final=0.0"])
    lrs = [server_lr(to_zero, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.02) and lrs[2] == pytest.approx(0.01) and lrs[-1] == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"federation.server_lr_final must be in \[0, 1\].*got {bad}"):
            load_config(None, [f"federation.server_lr_final={bad}"])


def test_client_takes_the_servers_lr_and_rejects_a_bad_one():
    assert round_lr(ConfigRecord({"lr": 0.0005}), 0.002) == 0.0005
    assert round_lr(ConfigRecord({}), 0.002) == 0.002
    for bad in (0.0, -1e-3, float("nan"), float("inf"), "0.001"):
        with pytest.raises(ValueError, match="round config 'lr'"):
            round_lr(ConfigRecord({"lr": bad}), 0.002)


def test_a_run_killed_mid_way_resumes_without_repeating_rounds(tmp_path):
    sets = [*TINY, "federation.num_rounds=6", "federation.server_ema=0.5"]
    args = [f"--set={s}" for s in sets]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", "--out", str(killed), *args],
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (killed / "metrics.jsonl").exists() and len(rounds(killed)) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed")
            time.sleep(0.2)
        else:
            pytest.fail("the run did not finish 2 rounds within 240 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray processes, everything in its session
        proc.wait()
    done_before = len(rounds(killed))
    assert 2 <= done_before < 6, "the kill came too late to test resuming"

    cfg = load_config(None, sets)
    simulate(cfg, killed, resume=True)
    assert [r["round"] for r in rounds(killed)] == [1, 2, 3, 4, 5, 6]

    straight = tmp_path / "straight"
    iterates = {}

    def on_round(record):
        iterates[record["round"]] = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]

    results = simulate(cfg, straight, on_round=on_round)
    a = torch.load(killed / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    # replies are aggregated in a canonical order, so the resumed run equals the straight one bit for bit
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert torch.equal(a[name], b[name]), f"{name}: max abs diff {diff:.2e}"
    # the served model is the average: the same after the kill and resume, and equal to
    # sum_i 0.5 ** (6 - i) w_i / (1 - 0.5 ** 6) over the rounds' models w_1 .. w_6
    served = {run: load_checkpoint(run / "model.pt")[0].shareable_state() for run in (killed, straight)}
    weights = {i: 0.5 ** (6 - i) * 0.5 / (1 - 0.5 ** 6) for i in range(1, 7)}
    for name in a:
        assert torch.equal(served[killed][name], served[straight][name]), name
        expected = sum(w * iterates[i][name].double() for i, w in weights.items()).float()
        torch.testing.assert_close(served[straight][name], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(served[straight][name], b[name]), f"{name}: model.pt is the last iterate"
    last, _ = load_checkpoint(straight / "model-last.pt")
    for name, value in last.shareable_state().items():
        assert torch.equal(value, b[name]), f"{name}: model-last.pt is not the last iterate"
    assert [r["ema_rounds"] for r in rounds(straight)] == [1, 2, 3, 4, 5, 6]
    assert results["served_weights"] == "moving average (federation.server_ema=0.5)"
    assert results["test"] != results["test_last_iterate"] and results["test_last_iterate"]["ndcg@10"] > 0


def test_resume_errors(tmp_path):
    cfg = load_config(None, [*TINY, "federation.num_rounds=1"])
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        simulate(cfg, tmp_path / "empty", resume=True)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds a run; resume it with --resume"):
        simulate(cfg, tmp_path / "used")
