"""A real deployment on 127.0.0.1: SuperLink (TLS, node authentication, state database) and one
SuperNode per region, each with its own data file, the public catalogue, its policy and ledger folder.

Everything is started by ``server/deploy.py``'s ``LocalFederation`` (its commands, a temporary
FLWR_HOME, free ports), and every process tree is ended by PID in the fixture's teardown. Flower starts one
ClientApp process per message, so a round costs several Python + torch start-ups per node; the
timeouts are generous for a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from server import deploy

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

DEMO = ["data.synthetic.num_users=150", "data.synthetic.num_items=40", "data.synthetic.min_length=4",
        "data.synthetic.max_length=12"]


@pytest.fixture
def deployment(tmp_path, request) -> Iterator[deploy.LocalFederation]:
    dep = deploy.LocalFederation(tmp_path, regions=getattr(request, "param", 3), demo_overrides=DEMO,
                                 env_base={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield dep
    finally:
        dep.close()
    assert all(p.poll() is not None for p in dep.procs)


def run_config(dep: deploy.LocalFederation, rounds: int) -> dict:
    return {"data.catalogue": dep.demo["catalogue"], "federation.num-rounds": rounds,
            "federation.num-clients": len(dep.demo["nodes"]), "federation.min-train-clients": 2,
            "federation.evaluate-every": rounds,
            "federation.run-dir": str(dep.root / "run"), "model.d-model": 16, "model.max-len": 12,
            "train.precision": "fp32", "eval.sampled": False,
            "privacy.mode": "dp-sgd", "privacy.noise-multiplier": 1.0}


def wait_for_rounds(path: Path, rounds: int, procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(rows) >= rounds:
                return rows
        assert all(p.poll() is None for p in procs), "a SuperLink or SuperNode died during the run"
        time.sleep(1)
    raise TimeoutError(f"{path} has fewer than {rounds} rounds after {timeout} s")


def test_tls_authenticated_deployment_trains_with_dp_and_secure_aggregation(deployment):
    dep = deployment
    t0 = time.monotonic()
    link = dep.start_superlink()
    names = sorted(dep.demo["nodes"])  # region-0, region-1, region-2
    dep.register(names + ["no-ca"])
    deploy.create_node_key(dep.root / "keys", "unregistered")
    nodes = [dep.start_node(n) for n in names]
    any_data = dep.demo["nodes"][names[0]]
    rogue = dep.start(dep.node_command("unregistered", data=any_data), "unregistered.log")
    no_ca = dep.start(dep.node_command("no-ca", data=any_data, ca=False), "no-ca.log")

    launched = dep.launch(ROOT, run_config(dep, 1))  # one round: the killed-node test below runs two in this setup
    assert launched.returncode == 0 and "Successfully started run" in launched.stdout, launched.stdout + launched.stderr

    # the two refused nodes: Flower logs the reason with its exit code and the process ends with 1
    for proc, log, why in ((rogue, "unregistered.log", "Failed to activate SuperNode"),
                           (no_ca, "no-ca.log", "CERTIFICATE_VERIFY_FAILED")):
        assert proc.wait(timeout=180) != 0
        text = (dep.root / log).read_text()
        assert "Exit Code: 305" in text and why in text, text[-2000:]

    rows = wait_for_rounds(dep.root / "run" / "metrics.jsonl", 1, [link, *nodes], timeout=600)
    seconds = time.monotonic() - t0
    assert [r["round"] for r in rows] == [1]
    for r in rows:  # only the three admitted nodes took part, all through secure aggregation with DP-SGD
        assert (r["clients_sampled"], r["clients_ok"], r["clients_failed"]) == (3, 3, 0), r
        assert r["secure_aggregation"] and not r["secagg_aborted"] and r["aggregated"]
        assert sorted(r["secagg_in_sum"]) == names
        assert r["dp_clients"] == 3 and r["dp_noise_multiplier_min"] == 1.0
    assert rows[0]["dp_epsilon_max"] > 0
    assert 0.0 <= rows[0]["test_ndcg@10"] <= 1.0
    model = torch.load(dep.root / "run" / "model.pt", weights_only=False)
    assert model["round"] == 1 and len(model["items"]["ids"]) == 40
    for name in names:  # each node's ledger is in its own state folder, its round's spend in it
        entries = [json.loads(line) for line in (dep.root / "nodes" / name / "ledger.jsonl").read_text().splitlines()]
        assert [(e["kind"], e["round"], e["client"]) for e in entries] == [("spend", 1, name)]
    print(f"deployment: 1 round in {seconds:.0f} s (start-up included); round seconds "
          f"{[round(r['seconds'], 1) for r in rows]}")


def node_status(dep: deploy.LocalFederation) -> list[dict]:
    """``flwr supernode ls``: one dict per node (``status``, ``online-at`` ...)."""
    out = subprocess.run([deploy.flower_executable("flwr"), "supernode", "ls", dep.FEDERATION, "--format", "json"],
                         env=dep.env, capture_output=True, text=True, timeout=120).stdout
    try:
        return json.loads(out[out.index("{"):])["nodes"]
    except (ValueError, KeyError):
        return []


def wait_online(dep: deploy.LocalFederation, timeout: float, *, since: str = "") -> float:
    """Seconds until the one node is online, activated at or after ``since`` ("YYYY-MM-DD HH:MM:SSZ")."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        nodes = node_status(dep)
        if len(nodes) == 1 and nodes[0]["status"] == "online" and nodes[0]["online-at"] >= since:
            return time.monotonic() - t0
        time.sleep(2)
    raise TimeoutError(f"the node is not online (since {since!r}) after {timeout} s: {node_status(dep)}")


def supernodes_under(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if "flower-supernode" in " ".join(c.cmdline())]


def test_supervised_node_comes_back_after_a_crash_and_a_superlink_restart(deployment):
    """The supervisor restarts a SIGKILLed SuperNode (refused with 2004 / exit code 305 while the
    SuperLink still holds the old session) and keeps it through a SuperLink restart; then it trains."""
    dep = deployment
    link = dep.start_superlink()
    dep.register(["region-0"])
    cmd = dep.node_command("region-0", data=dep.demo["nodes"]["region-0"])
    node_args = cmd[cmd.index("--node-config") + 1]
    cli = [sys.executable, "-m", "simulations.cli", "deploy", "supernode", "--supervise", "--backoff", "1",
           "--max-backoff", "8", "--log", str(dep.root / "node.log"), "--superlink", f"127.0.0.1:{dep.port}",
           "--ca", str(dep.root / "certs" / "ca.crt"), "--key", str(dep.root / "keys" / "region-0.key"),
           "--port", str(deploy.free_port()), "--name", "region-0", "--data", dep.demo["nodes"]["region-0"],
           "--catalogue", dep.demo["catalogue"], "--policy", dep.demo["policy"],
           "--state-dir", str(dep.root / "nodes")]
    assert 'name="region-0"' in node_args
    supervisor = dep.start(cli, "supervisor.log")
    wait_online(dep, timeout=180)

    first = supernodes_under(supervisor)
    assert len(first) == 1
    killed_at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    first[0].kill()  # the node crashes
    back_after_crash = wait_online(dep, timeout=300, since=killed_at)  # a new process was activated
    second = supernodes_under(supervisor)
    assert len(second) == 1 and second[0].pid != first[0].pid

    deploy.end_tree(link)  # the SuperLink goes down and comes back on the same database and port
    dep.procs.remove(link)
    link = dep.start_superlink()
    restarted = time.monotonic()

    cfg = {**run_config(dep, 1), "federation.num-clients": 1, "federation.min-train-clients": 1, "privacy.mode": "none",
           "privacy.noise-multiplier": 0.0}
    launched = dep.launch(ROOT, cfg)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    rows = wait_for_rounds(dep.root / "run" / "metrics.jsonl", 1, [link, supervisor], timeout=400)
    trained_after_restart = time.monotonic() - restarted
    assert (rows[0]["clients_ok"], rows[0]["clients_failed"]) == (1, 0)
    assert supervisor.poll() is None
    log = (dep.root / "node.log").read_text()
    assert log.count("Starting Flower SuperNode") >= 2
    sup_log = (dep.root / "supervisor.log").read_text()
    print(f"node online again {back_after_crash:.0f} s after SIGKILL; a round done {trained_after_restart:.0f} s "
          f"after the SuperLink restart; Flower exit codes seen: {sorted(set(deploy.FLOWER_EXIT.findall(log)))}; "
          f"restarts logged: {sup_log.count('restart')}")


def shared_its_keys(log: str) -> bool:
    """Whether a SuperNode's log shows its first secure-aggregation reply (the key shares) sent."""
    at = log.find("Sending: train.secagg message")
    return at >= 0 and "Sent successfully" in log[at:]


@pytest.mark.parametrize("deployment", [4], indirect=True)
def test_a_node_killed_mid_round_drops_out_and_the_round_completes(deployment):
    """SIGKILL one of four SuperNodes (and its processes) once it has sent its key shares: the
    SuperLink answers for the dead node, the server unmasks the sum without it from the others'
    shares of its secrets (dropout recovery), and the metrics say which client dropped where.
    (Four, not three: with three clients every SecAgg+ neighbourhood is 2 clients with threshold
    2, so no drop can be survived; with four it is 3 with threshold 2.)"""
    dep = deployment
    link = dep.start_superlink()
    names = sorted(dep.demo["nodes"])
    dep.register(names)
    nodes = {n: dep.start_node(n) for n in names}
    launched = dep.launch(ROOT, run_config(dep, 2))
    assert launched.returncode == 0, launched.stdout + launched.stderr

    victim = names[-1]
    ledger, log = dep.root / "nodes" / victim / "ledger.jsonl", dep.root / f"{victim}.log"
    deadline = time.monotonic() + 400
    while not shared_its_keys(log.read_text()):  # trained, advertised its keys and sent its key shares
        assert time.monotonic() < deadline, "the victim never reached the masked-input stage"
        time.sleep(0.1)
    proc = nodes.pop(victim)
    deploy.end_tree(proc, crash=True)  # the host dies: SIGKILL to the SuperNode and everything it started
    killed = time.monotonic()

    rows = wait_for_rounds(dep.root / "run" / "metrics.jsonl", 2, [link, *nodes.values()], timeout=600)
    first, second = rows
    assert first["clients_sampled"] == 4 and first["clients_failed"] == 1 and not first["secagg_aborted"]
    assert first["aggregated"] and victim not in first["secagg_in_sum"] and len(first["secagg_in_sum"]) == 3
    dropped = {stage: names for stage, names in first["secagg_dropped"].items() if names}
    # its pairwise masks are in the others' masked inputs: the sum is unmasked from their shares of its secrets
    assert dropped in ({"masked_input": [victim]}, {"unmasking": [victim]}), dropped
    assert any("Node Unavailable" in e for e in first["secagg_errors"]), first["secagg_errors"]  # the SuperLink's word
    assert (second["clients_sampled"], second["clients_ok"], second["clients_failed"]) == (3, 3, 0)
    assert victim not in second["secagg_in_sum"]
    assert torch.load(dep.root / "run" / "model.pt", weights_only=False)["round"] == 2
    spent = [json.loads(line)["round"] for line in ledger.read_text().splitlines()]
    assert spent == [1]  # the victim spent in round 1 (before it died) and never again
    for name in nodes:  # the survivors: one spend per round in their own state folders, epsilon growing
        entries = [json.loads(line) for line in (dep.root / "nodes" / name / "ledger.jsonl").read_text().splitlines()]
        assert [(e["kind"], e["round"], e["client"]) for e in entries] == [("spend", 1, name), ("spend", 2, name)]
    assert second["dp_epsilon_max"] > first["dp_epsilon_max"] > 0
    print(f"round 1 finished {first['seconds']:.0f} s after it began ({time.monotonic() - killed:.0f} s from the "
          f"kill to the end of round 2); dropped at {first['secagg_dropped']}")


def test_a_run_resumes_from_its_checkpoint_after_the_superlink_dies(deployment):
    """SIGKILL the SuperLink (and with it the run's ServerApp) after round 1; restart it on the same
    database and port; launching the run again with the same run directory resumes after the last
    checkpointed round: every round once in metrics.jsonl, the nodes' ledgers keep every spend."""
    dep = deployment
    link = dep.start_superlink()
    names = sorted(dep.demo["nodes"])
    dep.register(names)
    nodes = [dep.start_node(n) for n in names]
    # DP-SGD with plain updates: 2 messages per node and round instead of 5 keeps the test short
    cfg = {**run_config(dep, 3), "privacy.secure-aggregation": "off"}
    metrics = dep.root / "run" / "metrics.jsonl"

    launched = dep.launch(ROOT, cfg)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    wait_for_rounds(metrics, 1, [link, *nodes], timeout=400)
    deploy.end_tree(link, crash=True)  # the server host crashes mid-run
    dep.procs.remove(link)
    before = metrics.read_text().splitlines()
    checkpointed = torch.load(dep.root / "run" / "checkpoint.pt", weights_only=True)["round"]
    assert checkpointed == len(before) < 3

    link = dep.start_superlink()
    relaunched = dep.launch(ROOT, cfg)
    assert relaunched.returncode == 0, relaunched.stdout + relaunched.stderr
    rows = wait_for_rounds(metrics, 3, [link, *nodes], timeout=600)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert metrics.read_text().splitlines()[:len(before)] == before  # the rounds done before are untouched
    assert all((r["clients_ok"], r["clients_failed"]) == (3, 0) for r in rows[len(before):])
    assert torch.load(dep.root / "run" / "model.pt", weights_only=False)["round"] == 3
    for name in names:
        entries = [json.loads(line) for line in (dep.root / "nodes" / name / "ledger.jsonl").read_text().splitlines()]
        assert {e["kind"] for e in entries} == {"spend"}
        runs = list(dict.fromkeys(e["run"] for e in entries))
        assert len(runs) == 2  # the killed run and the resumed one
        first_run = [e["round"] for e in entries if e["run"] == runs[0]]
        second_run = [e["round"] for e in entries if e["run"] == runs[1]]
        # the resumed run starts after the checkpoint; a round the killed run had begun was spent there too
        assert second_run == list(range(checkpointed + 1, 4))
        assert first_run[:checkpointed] == list(range(1, checkpointed + 1))
    print(f"killed after round {checkpointed}; resumed run trained rounds {checkpointed + 1}-3")
