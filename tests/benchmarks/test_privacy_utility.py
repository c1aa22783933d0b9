"""`benchmarks/privacy_utility.py` on a real (tiny, SYNTHETIC) Flower simulation with distributed
noise: a point run once can be taken into a later table with ``--existing EPS=RUN_DIR`` (the same
figures, marked reused), and every way that could mislead is an error naming what is wrong: a
malformed spec, a spec for an epsilon not in the table, a run with different settings, a run that
is not finished, a run whose clients spent more than the target."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_users=160", "data.synthetic.num_items=40", "data.synthetic.num_merchants=4",
        "data.synthetic.max_length=20", "model.d_model=16", "model.max_len=20", "train.precision=fp32",
        "train.lr=1.0", "train.batch_size=16", "eval.sampled=false", "federation.partition=iid",
        "federation.num_clients=4", "federation.num_rounds=2", "federation.lr_schedule=constant",
        'privacy.noise_placement="distributed"', "privacy.sample_rate=0.5"]


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: benchmarks/federated.py
    spec = importlib.util.spec_from_file_location("privacy_utility", ROOT / "benchmarks" / "privacy_utility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, tmp_path, *extra, sets=TINY, name="t"):
    argv = ["--name", name, "--dataset", "synthetic", "--run-root", str(tmp_path / "runs"),
            "--out-dir", str(tmp_path / "out"), *extra]
    for s in sets:
        argv += ["--set", s]
    return module.main(argv)


def test_existing_point_is_reused_and_every_mismatch_is_an_error(tmp_path, monkeypatch):
    module = _script(monkeypatch)
    assert _run(module, tmp_path, "--epsilons", "8") == 0
    first = json.loads((tmp_path / "out" / "privacy-utility-t.json").read_text())["rows"][0]
    assert first["reused"] is False and first["epsilon_max"] <= 8.0 * (1 + 1e-3)
    done = tmp_path / "runs" / "eps-8"

    assert _run(module, tmp_path, "--epsilons", "8", "--existing", f"8={done}", name="again") == 0
    again = json.loads((tmp_path / "out" / "privacy-utility-again.json").read_text())["rows"][0]
    assert again["reused"] is True and again["run_dir"] == str(done)
    assert again["test"] == first["test"] and again["clients"] == first["clients"]

    with pytest.raises(SystemExit, match="expected EPSILON=RUN_DIR"):
        _run(module, tmp_path, "--epsilons", "8", "--existing", str(done))
    with pytest.raises(SystemExit, match=r"not in --epsilons"):
        _run(module, tmp_path, "--epsilons", "8", "--existing", f"4={done}")
    with pytest.raises(SystemExit, match=r"train\.lr is 1\.0 in that run, 0\.5 in this table"):
        _run(module, tmp_path, "--epsilons", "8", "--existing", f"8={done}", sets=[*TINY, "train.lr=0.5"])
    with pytest.raises(SystemExit, match=r"spent epsilon .* above the target 0\.5"):
        _run(module, tmp_path, "--epsilons", "0.5", "--existing", f"0.5={done}")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(done, unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(SystemExit, match="does not exist .not a finished run"):
        _run(module, tmp_path, "--epsilons", "8", "--existing", f"8={unfinished}")


def test_rates_for_epsilon_make_every_client_spend_the_target(tmp_path, monkeypatch):
    module = _script(monkeypatch)
    sets = [*TINY, "federation.partition=dirichlet-size", "federation.dirichlet_alpha=20.0"]  # clients of unequal size
    assert _run(module, tmp_path, "--epsilons", "8", "--rates-for-epsilon", sets=sets) == 0
    row = json.loads((tmp_path / "out" / "privacy-utility-t.json").read_text())["rows"][0]
    clients = row["clients"].values()
    assert all(8.0 - 0.01 <= c["epsilon"] <= 8.0 for c in clients)  # each its whole budget, none more
    assert len({c["sample_rate"] for c in clients}) == len({c["delta"] for c in clients}) > 1
    assert row["sample_rate_range"] == [min(c["sample_rate"] for c in clients), max(c["sample_rate"] for c in clients)]
    done = tmp_path / "runs" / "eps-8"
    with pytest.raises(SystemExit, match=r"privacy\.sample_rate is 0\.0 in that run, 0\.5 in this table"):
        _run(module, tmp_path, "--epsilons", "8", "--existing", f"8={done}", sets=sets)
    local = [s for s in sets if "noise_placement" not in s]
    with pytest.raises(SystemExit, match="--rates-for-epsilon needs"):
        _run(module, tmp_path, "--epsilons", "8", "--rates-for-epsilon", sets=local)
