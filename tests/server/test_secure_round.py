"""Secure aggregation in the server's round loop, in-process (no Ray): a Grid that calls our
ClientApp directly, so each check runs in about a second.

* FedAvg / FedProx / FedAdam: a securely aggregated run ends with the plain run's model, within the
  quantization error, and the strategy's state (FedAdam's moments) follows the same path;
* a client whose update is beyond the bound is dropped at stage 0 with an error naming it, the
  parameter, the value and the bound; the round completes with the others;
* a round with one sampled client is aborted, recorded, the model kept, and the run goes on;
* a client configured for secure aggregation refuses a plain train request;
* a malformed reply at any stage is that client's dropout at that stage (logged with its node id,
  counted in the metrics), the round completing with the others; below the threshold it aborts.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import make_client_app
from core_model.config import load_config
from privacy import PRIVACY_DECLINED, SECAGG_FAILED
from server.server_app import RoundLoop
from simulations.clients import load_federation

TINY = ["data.synthetic.num_users=120", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=0.005", "eval.sampled=false", "federation.partition=dirichlet-size",
        "federation.dirichlet_alpha=1.0", "federation.num_clients=4"]


class LocalGrid(Grid):
    """Every message goes straight to ``client_app`` (deep-copied, with a message id); one Context per node.

    ``ids`` are the nodes' Flower ids (large, like real ones, to check the 1..n numbering).
    """

    def __init__(self, client_app, n: int) -> None:
        self.app = client_app
        self.ids = [2**63 + 12345 * (i + 1) for i in range(n)]  # beyond signed 64-bit, as node ids may be
        self.ctx = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": n},
                                 state=RecordDict(), run_config={}) for i, nid in enumerate(self.ids)}
        self.sent: list[str] = []

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.ids)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            m = copy.deepcopy(m)  # the client must not see the server's objects
            self.sent.append(m.metadata.message_type)
            try:
                out.append(self.app(m, self.ctx[m.metadata.dst_node_id]))
            except Exception as err:  # as the simulation engine does: an exception is an error reply
                out.append(Message(Error(code=2, reason=repr(err)), reply_to=m))
        return out


@pytest.fixture(autouse=True)
def task_identity():
    """Messages can only be built inside a running app; pretend to be one."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_loop(cfg, run_dir: Path, client_app=None) -> tuple[list[dict], dict[str, torch.Tensor], LocalGrid]:
    torch.set_num_threads(1)
    log, _, partition = load_federation(cfg)
    grid = LocalGrid(client_app or make_client_app(cfg), partition.num_clients)
    RoundLoop(cfg, run_dir=run_dir, items=log.items, num_clients=partition.num_clients).run(grid)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, torch.load(run_dir / "checkpoint.pt", weights_only=False), grid


@pytest.mark.parametrize("strategy,num_rounds", [("fedavg", 1), ("fedprox", 1), ("fedadam", 2)])
def test_secure_run_ends_with_the_plain_runs_model(tmp_path, strategy, num_rounds):
    base = [*TINY, f"federation.num_rounds={num_rounds}", "federation.lr_schedule=\"constant\"",
            f'federation.strategy="{strategy}"', "federation.server_lr=0.001"]
    plain_rows, plain, _ = run_loop(load_config(None, [*base, 'privacy.secure_aggregation="off"']), tmp_path / "p")
    cfg = load_config(None, [*base, 'privacy.secure_aggregation="on"'])
    rows, secure, grid = run_loop(cfg, tmp_path / "s")

    assert [r["secure_aggregation"] for r in plain_rows] == [False] * num_rounds
    if strategy == "fedadam":  # the server's own step size, recorded every round
        assert [r["server_lr"] for r in rows] == [0.001] * num_rounds
    assert all(r["secure_aggregation"] and r["aggregated"] and not r["secagg_aborted"] for r in rows)
    assert rows[0]["secagg_clients"] == {"advertise_keys": 4, "share_keys": 4, "masked_input": 4, "unmasking": 4}
    assert rows[0]["secagg_degree"] == 3 and rows[0]["secagg_threshold"] == 2 and rows[0]["secagg_components"] == 1
    assert rows[0]["secagg_in_sum"] == ["dirichlet-0000", "dirichlet-0001", "dirichlet-0002", "dirichlet-0003"]
    assert rows[0]["users_trained"] == plain_rows[0]["users_trained"] == 120
    assert rows[0]["train_loss"] == pytest.approx(plain_rows[0]["train_loss"], rel=1e-6)
    assert grid.sent.count("train.secagg") == num_rounds * 3 * 4  # rounds x stages 1-3 x clients
    # Tolerance: the secure delta is within m * 2**-(scale_bits + 1) / N of the exact FedAvg delta
    # (m = 4 clients, N = 120 users: 1e-9); plain FedAvg sums m float32 products, each rounding costs up
    # to half an ulp of max |w|: (m + 1) * 2**-24 * max |w| (3e-7) covers both. A wrong weighting or
    # a lost client moves weights by 1e-3 or more.
    m, n_users, bits = 4, 120, cfg.privacy.secagg_scale_bits
    scale = max(v.abs().max().item() for v in plain["model"].values())
    tol = m * 2.0 ** -(bits + 1) / n_users + (m + 1) * 2.0**-24 * scale
    for name, expected in plain["model"].items():
        diff = (secure["model"][name] - expected).abs().max().item()
        assert diff <= tol, f"{name}: secure and plain differ by {diff:.2e} > {tol:.2e}"
    for key, value in plain["strategy"].items():  # FedAdam: m_t, v_t and current_arrays
        for name in value:
            assert torch.allclose(secure["strategy"][key][name].float(), value[name].float(), atol=tol, rtol=0)


def test_an_update_beyond_the_bound_drops_that_client_with_a_clear_error(tmp_path):
    # clients of 47, 70, 2 and 1 users; lr 1.2: AdamW's first step moves a weight by up to 1.2, so the
    # 70-user client contributes n_k * change up to 84 > 75 (its n_k = 70 itself is within the bound),
    # while the 2- and 1-user clients stay far inside it
    cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.secure_aggregation="on"',
                             "privacy.secagg_bound=75.0", "train.lr=1.2"])
    sizes = dict(zip(*[list(x) for x in (load_federation(cfg)[2].names, load_federation(cfg)[2].sizes())]))
    assert sizes == {"dirichlet-0000": 47, "dirichlet-0001": 70, "dirichlet-0002": 2, "dirichlet-0003": 1}
    rows, _, _ = run_loop(cfg, tmp_path)
    (row,) = rows
    dropped = row["secagg_dropped"]["advertise_keys"]
    assert "dirichlet-0001" not in row["secagg_in_sum"] and len(dropped) == row["clients_failed"]
    error = next(e for e in row["secagg_errors"] if "client dirichlet-0001" in e)
    assert error.startswith("advertise_keys: ") and f"error {SECAGG_FAILED}: " in error
    assert "contributes n_k * (w_local - w_global) = " in error and "(70 users x change " in error
    assert "outside the secure aggregation bound [-75, 75] (privacy.secagg_bound); nothing is clipped" in error
    # the round goes on with the others
    assert row["aggregated"] is True and row["secagg_aborted"] is False
    assert {"dirichlet-0002", "dirichlet-0003"} <= set(row["secagg_in_sum"])
    assert row["clients_ok"] == len(row["secagg_in_sum"]) == 4 - len(dropped)
    assert row["users_trained"] == sum(sizes[name] for name in row["secagg_in_sum"])


def test_a_round_with_one_client_is_aborted_and_the_run_goes_on(tmp_path):
    cfg = load_config(None, [*TINY, "federation.num_rounds=2", 'privacy.secure_aggregation="on"',
                             "federation.fraction_train=0.25"])  # one of 4 clients per round
    torch.manual_seed(cfg.federation.seed)
    rows, ckpt, grid = run_loop(cfg, tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["secagg_aborted"] is True and row["aggregated"] is False
        assert row["secagg_abort_reason"] == "secure aggregation needs at least 2 clients in a round, 1 sampled"
        assert row["clients_ok"] == 0
    assert "train" not in grid.sent  # nobody was asked to train for a round that cannot be secure
    from core_model.model import SASRec
    torch.manual_seed(cfg.federation.seed)
    initial = SASRec(cfg.model_config(load_federation(cfg)[0].num_items)).shareable_state()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in initial.items())  # the model is unchanged


def test_a_client_that_requires_secure_aggregation_refuses_a_plain_request(tmp_path):
    client_cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.secure_aggregation="on"'])
    server_cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.secure_aggregation="off"'])
    rows, _, _ = run_loop(server_cfg, tmp_path, client_app=make_client_app(client_cfg))
    (row,) = rows
    assert row["clients_declined"] == 4 and row["aggregated"] is False
    assert all("requires secure aggregation" in r for r in row["declined_reasons"])
    assert PRIVACY_DECLINED == 4101


def test_layout_rejects_a_model_that_does_not_match():
    from privacy.secagg_update import UpdateLayout
    layout = UpdateLayout.of({"a": np.zeros((2, 3)), "b": np.zeros(4)})
    assert layout.length == 11 and layout.sizes == (6, 4)
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        layout.check({"a": np.zeros((2, 3)), "c": np.zeros(4)}, "x")
    with pytest.raises(ValueError, match=r"'a' has shape \(3, 2\), the round's model has \(2, 3\)"):
        layout.check({"a": np.zeros((3, 2)), "b": np.zeros(4)}, "x")


def test_round_one_waits_for_the_whole_federation():
    """Flower sizes its sample before it waits for nodes: the loop waits for all of them first."""
    from server.server_app import wait_for_nodes

    class Arriving(LocalGrid):
        def __init__(self):
            super().__init__(None, 3)
            self.calls = 0

        def get_node_ids(self):
            self.calls += 1
            return self.ids[:min(3, self.calls)]  # one more node connects at every look

    grid = Arriving()
    wait_for_nodes(grid, 3, timeout=5, poll=0.001)
    assert grid.calls == 3
    with pytest.raises(TimeoutError, match="only 3 of the federation's 4 clients connected within "
                                           "federation.round_timeout = 0.01 s"):
        wait_for_nodes(grid, 4, timeout=0.01, poll=0.001)


def test_a_long_error_reason_keeps_its_start_and_its_end_in_the_metrics():
    from server.secure_aggregation import MAX_REASON, SecureRound

    rnd = SecureRound(None, server_round=1, bound=1.0, scale_bits=8, timeout=1.0)
    rnd._names = {1: "eu"}
    rnd._drop(1, "masked_input", "Traceback " + "x" * 5000 + " RuntimeError: what happened")
    (error,) = rnd._errors
    assert error.startswith("masked_input: eu: Traceback x") and error.endswith("RuntimeError: what happened")
    assert "[... 4438 characters, all in the log ...]" in error and len(error) < MAX_REASON + 80


# ------------------------------------------------------------------ malformed replies: dropouts

def corrupting_app(cfg, corrupt):
    """Our ClientApp, except that ``corrupt[(p, stage)](reply)`` rewrites partition ``p``'s reply at
    that secure aggregation stage in place before the server sees it."""
    inner = make_client_app(cfg)

    def app(msg, context):
        reply = inner(msg, context)
        if "secagg" in msg.content.config_records:
            rewrite = corrupt.get((int(context.node_config["partition-id"]), msg.content["secagg"]["stage"]))
            if rewrite is not None:
                rewrite(reply.content)
        return reply

    return app


def _edit(record: str, **changes):
    def rewrite(content):
        fields = dict(content[record])
        fields.update({k: change(fields[k]) for k, change in changes.items()})
        content[record] = ConfigRecord(fields)
    return rewrite


def _short_masked(content):
    masked = content["secagg-masked"]["masked"].numpy()
    content["secagg-masked"] = ArrayRecord({"masked": Array(masked[:-1].copy())})


def _bad_users(content):
    content["metrics"] = MetricRecord({"num-examples": 46.5, "train-loss": 1.0})


@pytest.mark.parametrize("stage,rewrite,reason", [
    ("advertise_keys", _edit("secagg", c_pk=lambda v: v[:31]), "field 'c_pk' must be 32 bytes, got 31 bytes"),
    ("advertise_keys", _bad_users, "metric 'num-examples' must be an int >= 0 (the client's users), got 46.5"),
    ("share_keys", _edit("secagg", ciphertexts=lambda v: v[:-1]), "field 'ciphertexts' must be a list of 3 byte"),
    ("masked_input", _short_masked, "field 'masked' must be "),
    ("unmasking", _edit("secagg", seed_owners=lambda v: v[:-1], seed_shares=lambda v: v[:-1]),
     "seed_owners [2, 3] differ from the request [2, 3, 4]"),
])
def test_a_malformed_reply_drops_that_client_and_the_round_completes(tmp_path, caplog, stage, rewrite, reason):
    cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.secure_aggregation="on"'])
    sizes = dict(zip(load_federation(cfg)[2].names, load_federation(cfg)[2].sizes().tolist()))
    with caplog.at_level(logging.WARNING, logger="server.secure_aggregation"):
        rows, _, grid = run_loop(cfg, tmp_path, client_app=corrupting_app(cfg, {(0, stage): rewrite}))
    (row,) = rows
    bad = "dirichlet-0000"  # partition 0, 47 users; 4 clients: degree 3, threshold 2

    assert row["aggregated"] is True and row["secagg_aborted"] is False
    assert row["secagg_dropped"] == {s: [bad] if s == stage else [] for s in
                                     ("advertise_keys", "share_keys", "masked_input", "unmasking")}
    assert row["secagg_malformed"] == 1 and row["clients_failed"] == 1
    (error,) = row["secagg_errors"]
    assert error.startswith(f"{stage}: {bad}: malformed reply: ") and reason in error, error
    # before its masked input it is out of the sum; at unmasking its update is in it (its shares are not needed)
    in_sum = sorted(sizes) if stage == "unmasking" else sorted(set(sizes) - {bad})
    assert row["secagg_in_sum"] == in_sum and row["clients_ok"] == len(in_sum)
    assert row["users_trained"] == sum(sizes[name] for name in in_sum)
    assert row["secagg_clients"][stage] == 3
    logged = [r.getMessage() for r in caplog.records if "dropped at" in r.getMessage()]
    assert logged == [f"round 1: secure aggregation: {bad} (node {grid.ids[0]}) dropped at {stage}: "
                      f"malformed reply: {logged[0].split('malformed reply: ', 1)[1]}"]
    assert reason in logged[0]


def test_malformed_replies_below_the_threshold_abort_the_round_explicitly(tmp_path):
    cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.secure_aggregation="on"'])
    short = _edit("secagg", seed_owners=lambda v: v[:-1], seed_shares=lambda v: v[:-1])
    rows, ckpt, _ = run_loop(cfg, tmp_path, client_app=corrupting_app(cfg, {(0, "unmasking"): short,
                                                                            (1, "unmasking"): short}))
    (row,) = rows
    assert row["secagg_aborted"] is True and row["aggregated"] is False and row["clients_ok"] == 0
    assert "share(s) available, 2 needed" in row["secagg_abort_reason"]
    assert row["secagg_dropped"]["unmasking"] == ["dirichlet-0000", "dirichlet-0001"]
    assert row["secagg_malformed"] == 2
    assert all("malformed reply: " in e for e in row["secagg_errors"])


def test_a_client_whose_share_ciphertexts_fail_is_left_out_and_the_round_completes(tmp_path):
    # partition 0's ciphertexts are garbage of the right size: the server cannot tell; each
    # neighbour refuses them, masks without it and says so; partition 0 is dropped at masked_input
    cfg = load_config(None, [*TINY, "federation.num_rounds=1", 'privacy.secure_aggregation="on"'])
    sizes = dict(zip(load_federation(cfg)[2].names, load_federation(cfg)[2].sizes().tolist()))
    garbage = _edit("secagg", ciphertexts=lambda v: [bytes(len(c)) for c in v])
    rows, _, _ = run_loop(cfg, tmp_path, client_app=corrupting_app(cfg, {(0, "share_keys"): garbage}))
    (row,) = rows
    assert row["aggregated"] is True and row["secagg_aborted"] is False
    assert row["secagg_dropped"]["masked_input"] == ["dirichlet-0000"] and row["secagg_malformed"] == 1
    assert row["secagg_in_sum"] == ["dirichlet-0001", "dirichlet-0002", "dirichlet-0003"]
    assert row["users_trained"] == sum(sizes.values()) - sizes["dirichlet-0000"]
    (error,) = row["secagg_errors"]
    assert error.startswith("masked_input: dirichlet-0000: malformed reply: ")
    assert "refused the share ciphertext(s) of client" in error
