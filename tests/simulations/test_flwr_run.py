"""`flwr run .` end to end: Flower's own CLI starts a local SuperLink on 127.0.0.1, which runs the
project's ServerApp and ClientApps (from pyproject.toml) on its simulation engine.

The SuperLink runs isolated: its own FLWR_HOME, its own ports, no dependency installation; it is
ended by PID at the end (Flower has no command to stop it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlinks_of(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmd and str(home) in cmd:
            found.append(proc)
    return found


def end(procs: list[psutil.Process]) -> None:
    tree = [c for p in procs for c in p.children(recursive=True)] + procs
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def test_flwr_run_trains_with_the_projects_apps(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    home.mkdir()
    # `flwr` starts `flower-superlink` from PATH: the environment's own scripts come first
    env = {**os.environ, "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    run_config = " ".join([
        'data.kind="synthetic"', "data.synthetic.num-users=90", "data.synthetic.num-items=30",
        "data.synthetic.max-length=15", "model.d-model=16", "model.max-len=15", 'train.precision="fp32"',
        "eval.sampled=false", 'federation.partition="iid"', "federation.num-clients=3", "federation.num-rounds=2",
        f'federation.run-dir="{out}"'])
    try:
        proc = subprocess.run(
            [str(flwr), "run", ".", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=2"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert superlinks_of(home), "flwr run did not start a local SuperLink under this FLWR_HOME"
        log = proc.stdout + proc.stderr
        deadline = time.time() + 60  # --stream can return as the last round's files land
        while time.time() < deadline and not (out / "model.pt").exists():
            time.sleep(0.5)
        assert (out / "metrics.jsonl").exists(), f"no run directory was written; flwr said:\n{log[-3000:]}"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2], log[-3000:]
        assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in rows)
        assert rows[1]["train_loss"] < rows[0]["train_loss"]
        assert 0.0 <= rows[-1]["test_ndcg@10"] <= 1.0
        model = torch.load(out / "model.pt", weights_only=False)
        assert model["round"] == 2
    finally:
        end(superlinks_of(home))
    assert not superlinks_of(home)
