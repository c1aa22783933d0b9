"""The ``fedrec`` command line.

    fedrec train      [--config FILE] [--data-kind K --data PATH] [--set key=value ...] [--out DIR]
    fedrec evaluate   --checkpoint RUN/model.pt [--data-kind K --data PATH]
    fedrec recommend  --checkpoint RUN/model.pt --history ID [ID ...] [-k 10] [--json]
    fedrec synthesize --out FILE.csv [--set data.synthetic.num_users=...]
    fedrec simulate   [--config FILE] [--data-kind K --data PATH] [--set key=value ...] [--out DIR]
    fedrec simulate   --resume RUN_DIR
    fedrec audit      RUN_DIR [--out DIR] [--policy FILE] [--empirical [--delta D]]
    fedrec deploy     certs | node-key | superlink | federation | register | supernode | run | demo-data

With no data given, ``train`` uses the built-in SYNTHETIC live-commerce log. This module is the
only place that configures logging and draws progress bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("fedrec")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with [data] [model] [train] [eval] sections")
    p.add_argument("--data-kind", help="synthetic | interactions | sasrec | ml-1m | ml-100k | twitch")
    p.add_argument("--data", help="path of the log file or folder (real data is always given by path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.epochs=50 (repeatable)")


def _config_from_args(args: argparse.Namespace):
    from core_model.config import load_config
    overrides = list(args.overrides)
    if args.data_kind:
        overrides.append(f'data.kind="{args.data_kind}"')
    if args.data:
        overrides.append(f'data.path="{args.data}"')
    return load_config(args.config, overrides)


def _progress(desc: str, disable: bool):
    """A per-epoch progress bar callback (tqdm), or None when disabled."""
    if disable:
        return None, None
    from tqdm import tqdm
    state: dict[str, Any] = {"bar": None}

    def on_step(step: int, steps: int, loss: float) -> None:
        if state["bar"] is None or step == 1:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=steps, desc=desc, leave=False, file=sys.stderr)
        state["bar"].update(1)
        state["bar"].set_postfix(loss=f"{loss:.3f}")

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
    return on_step, close


def _print_table(rows: list[tuple[str, dict[str, float]]]) -> None:
    keys = ["ndcg@10", "hr@10", "recall@20", "mrr", "sampled_ndcg@10", "sampled_hr@10"]
    print(f"{'':24s}" + "".join(f"{k:>17s}" for k in keys))
    for name, m in rows:
        print(f"{name:24s}" + "".join(f"{m[k]:17.4f}" if k in m else f"{'-':>17s}" for k in keys))


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from core_model.evaluate import Popularity, evaluate_ranking
    from core_model.features import build_model
    from core_model.pipeline import load_log, split_log
    from core_model.train import evaluate_model, fit, resolve_precision, select_device

    cfg = _config_from_args(args)
    log = load_log(cfg.data)
    split = split_log(log, cfg.data)
    summary = log.summary()
    print(f"data: {summary['name']}: {summary['users']} users, {summary['items']} items, "
          f"{summary['interactions']} interactions; {len(split)} users kept for leave-one-out "
          f"({split.removed_short_users} removed with fewer than {cfg.data.min_length} interactions)")
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    used = [name for name in ("model.pt", "metrics.jsonl") if (out / name).exists()]
    if used:
        raise ValueError(f"--out {out} already holds a run ({', '.join(used)}); choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / "data.json").write_text(json.dumps(summary, indent=2) + "\n")
    model = build_model(cfg, log.num_items, log.item_features)
    device = select_device(cfg.train.device)
    print(f"model: SASRec, {model.num_parameters():,} parameters, loss={model.config.loss}, "
          f"device={device}, precision={resolve_precision(cfg.train.precision, device)}; run directory {out}")
    on_step, close = _progress("epoch", args.quiet)

    def on_epoch(record: dict[str, Any]) -> None:
        if close:
            close()
        msg = (f"epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
               f"{record['users_per_second']:.0f} users/s")
        if "valid_ndcg@10" in record:
            msg += f"  valid NDCG@10 {record['valid_ndcg@10']:.4f}  HR@10 {record['valid_hr@10']:.4f}"
        print(msg, flush=True)

    extra = {"items": log.items.to_dict(), "item_titles": log.item_features.get("title"),
             "data": summary, "data_config": cfg.to_dict()["data"], "eval_config": cfg.to_dict()["eval"]}
    result = fit(model, split, cfg.train, run_dir=out, checkpoint_extra=extra,
                 on_step=on_step, on_epoch=on_epoch)
    ev = cfg.eval
    test = evaluate_model(model, split, which="test", exclude_history=ev.exclude_history,
                          sampled=ev.sampled, device=device)
    with torch.no_grad():
        pop = evaluate_ranking(Popularity(split.train, split.num_items), split.test_inputs(),
                               split.test_targets, num_items=split.num_items, max_len=model.config.max_len,
                               exclude_history=ev.exclude_history, sampled=ev.sampled, seed=ev.seed)
    results = {"test": test, "popularity_test": pop, **result,
               "protocol": {"split": "leave-one-out", "ranking": "full catalogue",
                            "history_excluded": ev.exclude_history, "sampled": "100 uniform negatives"},
               "data_synthetic": cfg.data.kind == "synthetic"}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"stopped after {result['epochs_run']} epochs ({result['stop_reason']}), "
          f"{result['train_seconds'] / 60:.1f} min training; best validation epoch {result['best']['epoch']}")
    print(f"test metrics (leave-one-out, full ranking, history "
          f"{'excluded' if ev.exclude_history else 'included'}; sampled = 100 negatives):")
    _print_table([("SASRec", test), ("popularity", pop)])
    print(f"model saved to {out / 'model.pt'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core_model.config import DataConfig
    from core_model.data import Vocabulary
    from core_model.pipeline import align_to_vocabulary, load_log, split_log
    from core_model.train import evaluate_model, load_checkpoint, select_device

    device = select_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    data_cfg = DataConfig(**ckpt["data_config"])
    if args.data_kind or args.data:
        data_cfg = DataConfig(**{**ckpt["data_config"], "kind": args.data_kind or data_cfg.kind,
                                 "path": args.data or data_cfg.path})
    log = align_to_vocabulary(load_log(data_cfg), Vocabulary.from_dict(ckpt["items"]))
    split = split_log(log, data_cfg)
    sampled = ckpt.get("eval_config", {}).get("sampled", True)
    metrics = evaluate_model(model, split, which=args.which, exclude_history=not args.include_history,
                             sampled=sampled, device=device)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.which} metrics on {log.name} ({len(split)} users, full ranking, history "
              f"{'included' if args.include_history else 'excluded'}):")
        _print_table([("SASRec", metrics)])
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from core_model.recommend import Recommender

    rec = Recommender.from_checkpoint(args.checkpoint, device=args.device)
    items = rec.recommend(args.history, k=args.k, exclude_history=not args.include_history)
    if args.json:
        print(json.dumps([r.__dict__ for r in items]))
    else:
        for rank, r in enumerate(items, 1):
            print(f"{rank:3d}. {r.item:>10s}  {r.score:8.3f}  {r.title}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from core_model.config import load_config
    from core_model.synthetic import SyntheticConfig, generate_live_commerce, write_csv

    cfg = load_config(None, args.overrides)
    log = generate_live_commerce(SyntheticConfig(**cfg.data.synthetic))
    rows = write_csv(log, args.out)
    print(f"wrote {rows} SYNTHETIC interactions ({log.num_users} users, {log.num_items} items) to {args.out}")
    return 0


PRIVACY_STATEMENT = (
    "privacy: user-level DP-SGD at every client. Unit of privacy: one user's whole history at that "
    "client. Epsilon (at the stated delta, {accountant} accountant, cumulative over all rounds so far, "
    "as each client accounts it in its own ledger) bounds what the server, the other clients and anyone "
    "with the model can learn about any one user.")
SECURE_STATEMENT = (
    "secure aggregation (SecAgg+): the server learns only the sum of the clients' masked, quantized "
    "updates, not any one client's update; a round it cannot unmask is aborted and the model kept.")


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import load_run_config, simulate

    if args.resume:
        if args.config or args.data or args.data_kind or args.overrides:
            raise ValueError("--resume continues a run with its own config.json; do not combine it with "
                             "--config, --data, --data-kind or --set")
        cfg, out = load_run_config(args.resume), Path(args.resume)
    else:
        cfg = _config_from_args(args)
        out = Path(args.out or f"runs/simulate-{time.strftime('%Y%m%d-%H%M%S')}")
    fed = cfg.federation
    print(f"federated simulation: {fed.strategy}, {fed.num_rounds} rounds, partition={fed.partition}, "
          f"data={cfg.data.kind}{' (SYNTHETIC)' if cfg.data.kind == 'synthetic' else ''}; run directory {out}",
          flush=True)

    def on_round(r: dict[str, Any]) -> None:
        msg = (f"round {r['round']:3d}/{fed.num_rounds}  clients {r['clients_ok']}/{r['clients_sampled']}"
               f"{' (' + str(r['clients_failed']) + ' failed)' if r['clients_failed'] else ''}")
        if "train_loss" in r:
            msg += f"  loss {r['train_loss']:.4f}"
        if "test_ndcg@10" in r:
            msg += f"  NDCG@10 {r['test_ndcg@10']:.4f}  HR@10 {r['test_hr@10']:.4f}"
        if "dp_epsilon_max" in r:
            msg += (f"  user-level epsilon <= {r['dp_epsilon_max']:.2f} at delta <= {r['dp_delta_max']:.1e} "
                    f"({cfg.privacy.accountant.upper()}, max over clients)")
        if r.get("clients_declined"):
            msg += f"  {r['clients_declined']} declined (privacy policy)"
        if r.get("secagg_aborted"):
            msg += f"  SECURE AGGREGATION ABORTED ({r['secagg_abort_reason']}): model unchanged"
        elif r.get("secure_aggregation"):
            msg += f"  securely aggregated (degree {r['secagg_degree']}, threshold {r['secagg_threshold']})"
        print(msg + f"  {r['seconds']:.1f}s", flush=True)

    if cfg.privacy.mode == "dp-sgd":
        print(PRIVACY_STATEMENT.format(accountant=cfg.privacy.accountant.upper()), flush=True)
    if cfg.privacy.secure_aggregation_enabled:
        print(SECURE_STATEMENT, flush=True)
    results = simulate(cfg, out, resume=bool(args.resume), on_round=on_round)
    print(f"final global model after {results['rounds']} rounds, {results['clients']} clients "
          f"({results['protocol']}):")
    _print_table([("federated SASRec", results["test"]), ("popularity", results["popularity_test"])])
    print(f"the server saw: {results['server_saw']}"
          + (f"; secure aggregation aborted in round(s) {results['secagg_rounds_aborted']}"
             if results.get("secagg_rounds_aborted") else ""))
    print(f"run directory {out}: metrics.jsonl, rounds.png, model.pt, results.json")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Verify the run's ledgers and receipts, recompute every epsilon; exit 1 when a problem is found."""
    from privacy.audit import audit_run
    from privacy.audit_report import write_report

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP notes on orders it skips
    report = audit_run(args.run, policy=args.policy, empirical=args.empirical, empirical_delta=args.delta)
    out = Path(args.out) if args.out else Path(args.run) / "audit"
    paths = write_report(report, out)
    verified = sum(c.verified for c in report.clients)
    print(f"audit of {args.run} ({report.layout}): {len(report.clients)} clients, {verified} verified; "
          f"{report.accountant}")
    for f in report.problems:
        print(f"PROBLEM {f.where()}: {f.kind}: {f.message}")
    fed = report.federation
    if fed.get("epsilon") is not None:
        print(f"federation: user-level epsilon {fed['epsilon']:.4g} (recomputed; ledgers {fed['epsilon_ledger']:.4g}) "
              f"at delta {fed['delta']:.3g}, the largest over clients (client {fed['client']})")
    if report.empirical is not None:
        e = report.empirical
        print(f"empirical: {e['canaries']} canaries ({e['members']} trained on), membership AUC {e['auc']:.3f}; "
              f"epsilon lower bound {e['epsilon_lower_bound']:.3g} at delta {e['delta']:.3g} "
              f"({1 - e['significance']:.0%} confidence): {e['verdict']}")
    unsigned = sorted({f.client for f in report.findings if f.kind == "unsigned"})
    verdict = f"FAILED: {len(report.problems)} problem(s)" if not report.ok else (
        "NO DP CLAIMED (no privacy ledgers): only the empirical test ran" if not report.clients else
        f"PASSED WITH WARNINGS: unsigned ledger lines (integrity not verified) at {', '.join(unsigned)}"
        if unsigned else "PASSED")
    print(verdict + "; report: " + ", ".join(str(p) for p in paths))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="centralized training + leave-one-out evaluation")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/train-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="leave-one-out metrics of a saved model")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data-kind")
    p.add_argument("--data")
    p.add_argument("--which", choices=("test", "valid"), default="test")
    p.add_argument("--include-history", action="store_true", help="rank items already in the history too")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k items for one history")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--history", nargs="+", required=True, help="raw item ids, oldest first")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--include-history", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("simulate", help="federated training on Flower's simulation engine")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/simulate-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed run from its checkpoint")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("audit", help="verify a run's privacy ledgers and receipts and recompute every epsilon")
    p.add_argument("run", type=Path, metavar="RUN",
                   help="a run directory (RUN/clients/<client>/ledger.jsonl, receipts.jsonl, metrics.jsonl) "
                        "or a folder of ledgers collected from a deployment (RUN/<client>/ledger.jsonl)")
    p.add_argument("--out", type=Path, help="report folder (default RUN/audit)")
    p.add_argument("--policy", type=Path, help="the clients' policy file (default: the one in RUN/config.json)")
    p.add_argument("--empirical", action="store_true",
                   help="also test what the final model leaks about the run's canary users (a run simulated with "
                        "--set privacy.audit_canaries=N): an empirical lower bound on epsilon, against the claim")
    p.add_argument("--delta", type=float, help="delta of the empirical lower bound (default: the ledgers' delta; "
                                               "without ledgers, 1 / (10 n) of the smallest client)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("synthesize", help="write the SYNTHETIC live-commerce log as CSV")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_synthesize)

    from server.deploy import add_deploy_parser
    add_deploy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input (data, config, ids): one clear line, no traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"fedrec {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
