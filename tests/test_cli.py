"""The fedrec command line, run in-process on tiny synthetic data: outcomes and error paths."""

import json

import pytest

from simulations.cli import main

TINY = ["--set", "data.synthetic.num_users=120", "--set", "data.synthetic.num_items=40",
        "--set", "data.synthetic.num_merchants=4", "--set", "data.synthetic.max_length=20",
        "--set", "model.d_model=16", "--set", "model.max_len=20", "--set", "train.epochs=2",
        "--set", "train.eval_every=1", "--set", "eval.sampled=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), "--quiet", *TINY]) == 0
    return out


def test_train_writes_a_complete_run_directory(trained):
    for name in ("config.json", "data.json", "metrics.jsonl", "model.pt", "results.json"):
        assert (trained / name).is_file(), name
    results = json.loads((trained / "results.json").read_text())
    assert results["data_synthetic"] is True
    assert 0.0 <= results["test"]["ndcg@10"] <= 1.0 and results["test"]["users"] == 120
    assert "SYNTHETIC" in " ".join(json.loads((trained / "data.json").read_text())["report"]["notes"])


def test_evaluate_and_recommend_from_the_checkpoint(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained / "model.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    results = json.loads((trained / "results.json").read_text())
    assert metrics["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"])
    assert main(["recommend", "--checkpoint", str(trained / "model.pt"), "--history", "item-0001",
                 "item-0002", "-k", "5", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 5 and not {"item-0001", "item-0002"} & {r["item"] for r in recs}
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)


def test_recommend_unknown_item_is_a_clear_error(trained, capsys):
    assert main(["recommend", "--checkpoint", str(trained / "model.pt"), "--history", "item-0001",
                 "no-such-item"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-item' at position 1 is not in the model's catalogue" in err


def test_train_refuses_a_used_run_directory(trained, capsys):
    assert main(["train", "--out", str(trained), "--quiet", *TINY]) == 2
    assert "already holds a run (model.pt, metrics.jsonl)" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["train", "--set", "train.lr=-1"], "lr must be > 0, got -1.0"),
    (["train", "--data-kind", "sasrec", "--data", "/nonexistent/log.txt"], "/nonexistent/log.txt"),
    (["evaluate", "--checkpoint", "/nonexistent/model.pt"], "/nonexistent/model.pt does not exist"),
])
def test_bad_input_exits_2_with_one_clear_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_synthesize_writes_a_csv(tmp_path, capsys):
    out = tmp_path / "log.csv"
    assert main(["synthesize", "--out", str(out), "--set", "data.synthetic.num_users=10"]) == 0
    assert out.read_text().splitlines()[0] == "user,item,timestamp,event,group,region"
    assert "SYNTHETIC" in capsys.readouterr().out
