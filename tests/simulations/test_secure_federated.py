"""Secure aggregation in real Flower simulations (Ray engine) on tiny synthetic data.

* secure vs plain aggregation of the same run (no DP, fixed seed): the same model within the
  quantization error;
* a client that fails at the masked-input stage: the round completes with the survivors' exact
  aggregate and the metrics name the dropout; two that fail (below the threshold): the round is
  aborted explicitly, the model kept, and the next round runs;
* malformed replies (garbage share ciphertexts in round 1, a truncated masked vector in round 2):
  each costs only its sender, who is dropped; both rounds complete with the others' exact aggregate;
* DP-SGD and secure aggregation together: ledgers written, metrics and the command line say what
  the server saw.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client.client_app import client_seed
from core_model.config import load_config
from core_model.model import SASRec
from core_model.train import local_train
from privacy.ledger import PrivacyLedger
from server.server_app import client_lr
from simulations.clients import load_federation
from simulations.runner import simulate

from secagg_apps import failing_client_app, malformed_client_app  # tests/simulations/secagg_apps.py

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=150", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=0.005", "eval.sampled=false", "federation.partition=dirichlet-size",
        "federation.dirichlet_alpha=1.0"]


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def fedavg_by_hand(cfg, state: dict[str, torch.Tensor], rnd: int, clients: list[int]) -> dict[str, torch.Tensor]:
    """One FedAvg round over ``clients`` without Flower: the same local training and seeds."""
    log, split, partition = load_federation(cfg)
    torch.set_num_threads(1)  # the simulated clients train single-threaded
    updates, weights = [], []
    for cid in clients:
        model = SASRec(cfg.model_config(log.num_items))
        model.load_shareable_state(state)
        client_split = split.subset(partition.rows[cid])
        local_train(model, client_split.train, replace(cfg.train, lr=client_lr(cfg, rnd)),
                    epochs=cfg.federation.local_epochs,
                    seed=client_seed(cfg.federation.seed, rnd, partition.names[cid]))
        updates.append(model.shareable_state())
        weights.append(len(client_split))
    w = np.array(weights, dtype=np.float64) / sum(weights)
    return {k: sum(float(wi) * u[k].double() for wi, u in zip(w, updates)).float() for k in state}


def test_secure_and_plain_aggregation_give_the_same_model(tmp_path):
    base = [*TINY, "federation.num_clients=3", "federation.num_rounds=1"]
    plain_cfg = load_config(None, [*base, 'privacy.secure_aggregation="off"'])
    secure_cfg = load_config(None, [*base, 'privacy.secure_aggregation="on"'])
    sizes = load_federation(secure_cfg)[2].sizes().tolist()
    assert len(set(sizes)) == 3, sizes  # unequal clients: a weighted and an unweighted mean differ
    plain_results = simulate(plain_cfg, tmp_path / "plain")
    results = simulate(secure_cfg, tmp_path / "secure")

    (row,) = rounds(tmp_path / "secure")
    assert row["secure_aggregation"] is True and row["secagg_aborted"] is False and row["aggregated"] is True
    assert row["secagg_clients"] == {"advertise_keys": 3, "share_keys": 3, "masked_input": 3, "unmasking": 3}
    assert row["secagg_dropped"] == {"advertise_keys": [], "share_keys": [], "masked_input": [], "unmasking": []}
    assert (row["secagg_degree"], row["secagg_threshold"], row["secagg_components"]) == (2, 2, 1)
    assert row["users_trained"] == 150 and row["clients_ok"] == 3
    assert rounds(tmp_path / "plain")[0]["secure_aggregation"] is False
    assert results["server_saw"] == "only the sum of the clients' masked, quantized (not DP-noised) updates"
    assert plain_results["server_saw"] == "each client's update" and plain_results["secure_aggregation"] is False

    # Tolerance: the secure delta is within m * 2**-(scale_bits + 1) / N of the exact FedAvg delta
    # (m = 3 clients, N = 150 users, 24 bits: 6e-10); plain FedAvg sums m float32 products, each
    # rounding up to half an ulp of max |w|: (m + 1) * 2**-24 * max |w|. Together about 2.4e-7 here.
    plain, secure = model_of(tmp_path / "plain"), model_of(tmp_path / "secure")
    m, bits = 3, secure_cfg.privacy.secagg_scale_bits
    scale = max(v.abs().max().item() for v in plain.values())
    tol = m * 2.0 ** -(bits + 1) / 150 + (m + 1) * 2.0**-24 * scale
    for name in plain:
        diff = (secure[name] - plain[name]).abs().max().item()
        assert diff <= tol, f"{name}: secure and plain differ by {diff:.2e} > {tol:.2e}"


def test_dropouts_at_masked_input_survivors_sum_then_an_abort_below_threshold(tmp_path):
    # 5 clients: degree 4, threshold 3; a client may lose one neighbour, not two
    cfg = load_config(None, [*TINY, "federation.num_clients=5", "federation.num_rounds=3",
                             'privacy.secure_aggregation="on"'])
    names = load_federation(cfg)[2].names
    weights = {}
    torch.manual_seed(cfg.federation.seed)
    initial = SASRec(cfg.model_config(load_federation(cfg)[0].num_items)).shareable_state()

    def on_round(record):  # the checkpoint of the round is written before on_round is called
        weights[record["round"]] = model_of(tmp_path)

    simulate(cfg, tmp_path, on_round=on_round,
             client_app=failing_client_app(cfg, {1: {1}, 2: {1, 4}}))
    r1, r2, r3 = rounds(tmp_path)

    # round 1: partition 1 dropped after sharing its keys; its masks are removed, the others' sum is exact
    assert r1["aggregated"] is True and r1["secagg_aborted"] is False
    assert (r1["secagg_degree"], r1["secagg_threshold"]) == (4, 3)
    assert r1["secagg_dropped"] == {"advertise_keys": [], "share_keys": [], "masked_input": [names[1]],
                                    "unmasking": []}
    assert r1["secagg_clients"] == {"advertise_keys": 5, "share_keys": 5, "masked_input": 4, "unmasking": 4}
    assert r1["clients_ok"] == 4 and r1["clients_failed"] == 1 and names[1] not in r1["secagg_in_sum"]
    assert any(e.startswith(f"masked_input: {names[1]}: ") and "injected failure of partition 1" in e
               for e in r1["secagg_errors"])
    survivors = [0, 2, 3, 4]
    assert r1["users_trained"] == sum(int(load_federation(cfg)[2].sizes()[c]) for c in survivors)
    expected = fedavg_by_hand(cfg, initial, 1, survivors)
    for name in expected:
        assert torch.allclose(weights[1][name], expected[name], atol=1e-5, rtol=1e-4), name
    with_all = fedavg_by_hand(cfg, initial, 1, list(range(5)))
    assert any(not torch.allclose(weights[1][n], with_all[n], atol=1e-5, rtol=1e-4) for n in expected)

    # round 2: two of five dropped at masked_input: the survivors' self masks have too few shares
    assert r2["secagg_aborted"] is True and r2["aggregated"] is False and r2["clients_ok"] == 0
    assert r2["secagg_dropped"]["masked_input"] == sorted([names[1], names[4]])
    assert "cannot reconstruct the self-mask seed of client" in r2["secagg_abort_reason"]
    assert "share(s) available, 3 needed" in r2["secagg_abort_reason"]
    assert all(torch.equal(weights[2][k], weights[1][k]) for k in weights[1])  # the model is unchanged

    # round 3: the run went on, with everybody
    assert r3["aggregated"] is True and r3["secagg_aborted"] is False and r3["clients_ok"] == 5
    assert any(not torch.equal(weights[3][k], weights[2][k]) for k in weights[2])


def test_malformed_replies_cost_only_their_sender(tmp_path):
    cfg = load_config(None, [*TINY, "federation.num_clients=5", "federation.num_rounds=2",
                             'privacy.secure_aggregation="on"'])
    names, sizes = load_federation(cfg)[2].names, load_federation(cfg)[2].sizes()
    torch.manual_seed(cfg.federation.seed)
    initial = SASRec(cfg.model_config(load_federation(cfg)[0].num_items)).shareable_state()
    weights = {}
    simulate(cfg, tmp_path, on_round=lambda record: weights.setdefault(record["round"], model_of(tmp_path)),
             client_app=malformed_client_app(cfg, {(1, 1, "share_keys"): "garbage-ciphertexts",
                                                   (2, 3, "masked_input"): "short-masked"}))
    r1, r2 = rounds(tmp_path)
    for row, bad in ((r1, 1), (r2, 3)):
        assert row["aggregated"] is True and row["secagg_aborted"] is False, row.get("secagg_abort_reason")
        assert row["secagg_dropped"]["masked_input"] == [names[bad]] and row["secagg_malformed"] == 1
        assert row["clients_ok"] == 4 and row["clients_failed"] == 1
        assert row["users_trained"] == int(sizes.sum() - sizes[bad])
        (error,) = row["secagg_errors"]
        assert error.startswith(f"masked_input: {names[bad]}: malformed reply: round {row['round']}, masked_input")
    assert "refused the share ciphertext(s) of client" in r1["secagg_errors"][0]
    assert "field 'masked' must be " in r2["secagg_errors"][0]
    expected = fedavg_by_hand(cfg, initial, 1, [0, 2, 3, 4])  # the survivors' exact FedAvg
    for name in expected:
        assert torch.allclose(weights[1][name], expected[name], atol=1e-5, rtol=1e-4), name


def test_dp_sgd_with_secure_aggregation_writes_ledgers_and_says_what_the_server_saw(tmp_path, capsys):
    from simulations.cli import main

    run = tmp_path / "run"
    sets = [*TINY, "federation.num_clients=3", "federation.num_rounds=1", "train.batch_size=16",
            'privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0"]  # secure_aggregation "auto": on
    assert main(["simulate", "--out", str(run), *[f"--set={s}" for s in sets]]) == 0
    out = capsys.readouterr().out
    (row,) = rounds(run)
    assert row["secure_aggregation"] is True and row["aggregated"] is True and row["secagg_aborted"] is False
    assert row["dp_clients"] == 3 and row["dp_epsilon_max"] > 0
    ledgers = sorted((run / "clients").glob("*/ledger.jsonl"))
    assert len(ledgers) == 3
    for path in ledgers:
        (entry,) = PrivacyLedger(path).entries()
        assert entry.kind == "spend" and entry.round == 1 and entry.epsilon <= row["dp_epsilon_max"]
    assert "secure aggregation (SecAgg+): the server learns only the sum" in out
    line = next(line for line in out.splitlines() if line.startswith("round   1/1"))
    assert "user-level epsilon <=" in line and "securely aggregated (degree 2, threshold 2)" in line
    assert "the server saw: only the sum of the clients' masked, quantized, DP-noised updates" in out
    results = json.loads((run / "results.json").read_text())
    assert results["secure_aggregation"] is True and results["secagg_rounds_aborted"] == []
