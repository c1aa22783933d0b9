"""Privacy-utility table: federated SASRec with user-level DP-SGD at several target epsilons.

    python benchmarks/privacy_utility.py --name ml1m-regions --dataset ml-1m --epsilons 1 2 4 8 \
        --baseline benchmarks/results/federated-ml1m-regions-fedavg.json \
        --set federation.partition=attribute --set federation.partition_attribute=region \
        --set federation.num_rounds=20 --set federation.local_epochs=2 --set train.batch_size=32

For every target epsilon it runs ``fedrec simulate`` (``simulations.runner.simulate``) with
``privacy.mode="dp-sgd"`` and ``privacy.target_epsilon`` (noise calibrated once per client for the
whole run), then reads every client's privacy ledger: the epsilon each client actually spent
(at its delta = 1 / (10 n) unless ``privacy.delta`` is set, PRV accountant unless
``privacy.accountant`` is set), its noise multiplier and sample rate. The unit of privacy is one
user's whole history at their client; the epsilon bounds what the server, the other clients and
anyone with the model can learn about one user. Writes
``benchmarks/results/privacy-utility-<name>.json`` and ``privacy-utility-<name>.png`` (final
full-ranking NDCG@10 and HR@10 against epsilon, with the non-private ``--baseline`` run and
popularity as lines).

With ``--set privacy.noise_placement='"distributed"'`` (one DP step of the whole federation per
round, the noise shared out among the clients; docs/privacy.md) every client must use the same
noise multiplier, so for each target the script sets ``privacy.noise_multiplier`` to the largest
of the clients' own calibrations over ``federation.num_rounds`` steps
(``privacy.dp.shared_noise_multiplier``): the client with the highest sample rate or the smallest
delta spends exactly the target, the others less (after the transition table's release, when
``model.transitions`` is on: the release's epsilon is part of the target). With ``--rates-for-epsilon`` each client then
samples at its own rate, the one with which that multiplier spends exactly the target at its delta
(``privacy.sample_rate_for_epsilon``): every client spends the whole target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import data_settings  # noqa: E402  (benchmarks/federated.py, this script's folder)
from core_model.config import ExperimentConfig, load_config  # noqa: E402
from privacy.dp import release_noise_for_share, shared_noise_multiplier  # noqa: E402
from privacy.ledger import PrivacyLedger  # noqa: E402
from simulations.clients import load_federation  # noqa: E402
from simulations.runner import load_run_config, simulate  # noqa: E402

DATASETS = {"ml-1m": ("ml-1m", "ml-1m"), "ml-100k": ("ml-100k", "ml-100k"),
            "twitch": ("twitch", "twitch/twitch105k.csv.gz"), "synthetic": ("synthetic", "")}


def ledger_summary(run_dir: Path) -> dict:
    clients = {}
    for path in sorted((run_dir / "clients").glob("*/ledger.jsonl")):
        entries = PrivacyLedger(path).entries()
        spends = [e for e in entries if e.kind == "spend" and e.round >= 1]  # training rounds
        releases = [e for e in entries if e.kind == "spend" and e.round == 0]  # the transition table's
        last = max([*spends, *releases], key=lambda e: e.epsilon)
        clients[path.parent.name] = {"epsilon": last.epsilon, "delta": last.delta, "accountant": last.accountant,
                                     "noise_multiplier": spends[-1].noise_multiplier,
                                     "sample_rate": spends[-1].sample_rate,
                                     "max_grad_norm": spends[-1].max_grad_norm, "rounds": len(spends),
                                     "steps": sum(e.steps for e in spends),
                                     "refusals": sum(e.kind == "refusal" for e in entries)}
        if releases:
            clients[path.parent.name].update({"transitions_noise_multiplier": releases[0].noise_multiplier,
                                              "transitions_epsilon": releases[0].epsilon})
    if not clients:
        raise RuntimeError(f"{run_dir}: no client ledgers under {run_dir / 'clients'}")
    return clients


AUTO_RESOLVED = {("privacy", "distributed_min_clients"): 0, ("privacy", "state_dir"): ""}
"""Settings whose default means "decide at run time": the runner stores the resolved value (the
clients per round, ``<run dir>/clients``), which is decided by settings that are compared."""


def existing_run(spec: str) -> tuple[float, Path]:
    """``--existing EPS=RUN_DIR`` -> (EPS, RUN_DIR), with an error naming the value when malformed."""
    eps, sep, run_dir = spec.partition("=")
    try:
        value = float(eps)
    except ValueError:
        value = float("nan")
    if not sep or not run_dir or not value > 0:
        raise SystemExit(f"--existing {spec!r}: expected EPSILON=RUN_DIR with epsilon > 0, e.g. 8=runs/x4-q2")
    return value, Path(run_dir)


def check_existing(run_dir: Path, cfg, eps: float, *, release_noise_free: bool = False) -> dict:
    """The finished run in ``run_dir`` as this table's point for target ``eps``.

    Its configuration must equal the one this invocation would run in everything but the noise
    multiplier (which its ledgers state) and, with ``release_noise_free`` (``--release-share``), the
    transition table's release noise (stated by the ledgers too). A setting left to ``AUTO_RESOLVED`` here matches what the
    run resolved it to; a setting the run's ``config.json`` lacks (it predates it) matches this
    code's default. A mismatch is an error naming the first differing setting; a client that spent
    more than ``eps`` is one too (checked from the ledgers by the caller).
    """
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"--existing {eps:g}={run_dir}: {results_path} does not exist (not a finished run)")
    theirs = json.loads((run_dir / "config.json").read_text())
    load_run_config(run_dir)  # still a valid configuration for this code
    ours, defaults = cfg.to_dict(), ExperimentConfig().to_dict()
    for section in ours:
        for key in sorted(set(ours[section]) | set(theirs.get(section, {}))):
            mine, other = ours[section].get(key), theirs.get(section, {}).get(key)
            if (section, key) == ("privacy", "noise_multiplier"):
                continue
            if (section, key) == ("privacy", "transitions_noise_multiplier") and release_noise_free:
                continue
            if (section, key) in AUTO_RESOLVED and mine == AUTO_RESOLVED[section, key]:
                continue  # auto here; the runner stored what it resolved it to
            if key not in theirs.get(section, {}) and mine == defaults[section].get(key):
                continue  # the run predates this setting and had its (default) behaviour
            if mine != other:
                raise SystemExit(f"--existing {eps:g}={run_dir}: {section}.{key} is {other!r} in that run, "
                                 f"{mine!r} in this table")
    return json.loads(results_path.read_text())


def plot(rows: list[dict], baseline: dict | None, popularity: dict | None, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [r["epsilon_max"] for r in rows]
    for metric, color in (("ndcg@10", "tab:blue"), ("hr@10", "tab:orange")):
        ax.plot(eps, [r["test"][metric] for r in rows], marker="o", color=color, label=f"DP-SGD {metric}")
        if baseline:
            ax.axhline(baseline[metric], color=color, ls="--", lw=1, label=f"no DP {metric}")
        if popularity:
            ax.axhline(popularity[metric], color=color, ls=":", lw=1, label=f"popularity {metric}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("user-level epsilon spent (max over clients; delta = 1/(10 n) per client, PRV)")
    ax.set_ylabel("final test metric (full ranking, history excluded)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--epsilons", type=float, nargs="+", required=True)
    parser.add_argument("--baseline", type=Path, help="a benchmarks/federated.py result without DP, same settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-root", type=Path, help="where the runs go (default runs/privacy-utility-<name>)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--existing", action="append", default=[], metavar="EPS=RUN_DIR",
                        help="take the point for target EPS from this finished run (same settings but the "
                             "noise multiplier, checked) instead of running it; repeatable")
    parser.add_argument("--release-share", type=float, default=None, metavar="S",
                        help="with model.transitions: for each target, release the transition table at the noise "
                             "with which the release alone spends S of the target at every client "
                             "(privacy.transitions_noise_multiplier; DP-SGD is then calibrated for the rest)")
    parser.add_argument("--rates-for-epsilon", action="store_true",
                        help="distributed noise: after choosing the shared multiplier as without this flag, let "
                             "every client sample at the rate with which it spends the target "
                             "(privacy.sample_rate_for_epsilon) instead of the one rate privacy.sample_rate")
    args = parser.parse_args(argv)
    base = data_settings(*DATASETS[args.dataset], args.data_root)
    if base is None:
        return 2
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    root = args.run_root or ROOT / "runs" / f"privacy-utility-{args.name}"
    existing = dict(existing_run(spec) for spec in args.existing)
    unused = sorted(set(existing) - set(args.epsilons))
    if unused:
        raise SystemExit(f"--existing given for epsilon {unused}, which is not in --epsilons {args.epsilons}")
    rows, popularity = [], None
    common = [*base, *args.overrides, 'privacy.mode="dp-sgd"']
    # --release-share sets each target's release noise below; a placeholder until then
    placeholder = ["privacy.transitions_noise_multiplier=1.0"] if args.release_share is not None else []
    probe = load_config(None, [*common, "privacy.noise_multiplier=1.0", *placeholder])
    distributed = probe.privacy.noise_placement == "distributed"
    if distributed:  # one multiplier for every client, from every client's size
        _, _, partition = load_federation(probe)
        sizes = [len(r) for r in partition.rows]
    if args.rates_for_epsilon and not distributed:
        raise SystemExit("--rates-for-epsilon needs --set privacy.noise_placement='\"distributed\"' (one multiplier "
                         "shared by every client, one step per round)")
    if args.release_share is not None and not distributed:
        _, _, partition = load_federation(probe)
        sizes = [len(r) for r in partition.rows]
    base_common = common
    for eps in args.epsilons:
        # --rates-for-epsilon: the multiplier as without it, then every client samples at its own rate for eps
        rates = ["privacy.sample_rate=0", f"privacy.sample_rate_for_epsilon={eps!r}"] if args.rates_for_epsilon else []
        common = base_common
        if args.release_share is not None:  # this target's release noise, then DP-SGD for what it leaves
            release = release_noise_for_share(probe.privacy, client_sizes=sizes, target_epsilon=eps,
                                              share=args.release_share)
            common = [*base_common, f"privacy.transitions_noise_multiplier={release!r}"]
            probe = load_config(None, [*common, "privacy.noise_multiplier=1.0"])
        if not distributed:
            cfg = load_config(None, [*common, f"privacy.target_epsilon={eps}"])
        elif eps in existing:
            # the multiplier is not compared: the run's ledgers state the one it used
            cfg = load_config(None, [*common, "privacy.noise_multiplier=1.0", *rates])
        else:
            sigma = shared_noise_multiplier(probe.privacy, client_sizes=sizes, batch_size=probe.train.batch_size,
                                            target_epsilon=eps, steps=probe.federation.num_rounds)
            cfg = load_config(None, [*common, f"privacy.noise_multiplier={sigma!r}", *rates])
        run_dir = root / f"eps-{eps:g}"
        start = time.perf_counter()
        if eps in existing:
            run_dir = existing[eps]
            results = check_existing(run_dir, cfg, eps, release_noise_free=args.release_share is not None)
            wall = results["wall_seconds_this_process"]
        else:
            results = simulate(cfg, run_dir)
            wall = time.perf_counter() - start
        clients = ledger_summary(run_dir)
        spent = max(c["epsilon"] for c in clients.values())
        if spent > eps * (1 + 1e-3):
            raise SystemExit(f"{run_dir}: a client spent epsilon {spent:.4f}, above the target {eps:g}")
        popularity = results["popularity_test"]
        row = {"target_epsilon": eps, "epsilon_max": spent,
               "delta_max": max(c["delta"] for c in clients.values()),
               "accountant": cfg.privacy.accountant, "max_grad_norm": cfg.privacy.max_grad_norm,
               "noise_multiplier_range": [min(c["noise_multiplier"] for c in clients.values()),
                                          max(c["noise_multiplier"] for c in clients.values())],
               "sample_rate_range": [min(c["sample_rate"] for c in clients.values()),
                                     max(c["sample_rate"] for c in clients.values())],
               "rounds": results["rounds"], "test": results["test"], "wall_minutes": wall / 60,
               **{k: results[k] for k in ("served_weights", "test_last_iterate") if k in results},
               "reused": eps in existing,
               **({"transitions_noise_multiplier": max(c["transitions_noise_multiplier"] for c in clients.values()),
                   "transitions_epsilon_max": max(c["transitions_epsilon"] for c in clients.values())}
                  if all("transitions_epsilon" in c for c in clients.values()) else {}),
               "clients": clients, "run_dir": str(run_dir)}
        rows.append(row)
        print(f"target epsilon {eps:g}: NDCG@10 {row['test']['ndcg@10']:.4f} HR@10 {row['test']['hr@10']:.4f}; "
              f"spent epsilon <= {row['epsilon_max']:.3f} at delta <= {row['delta_max']:.2e} "
              f"({row['accountant'].upper()}, user-level, max over clients); noise "
              f"{row['noise_multiplier_range'][0]:.3f}-{row['noise_multiplier_range'][1]:.3f}, sample rate "
              f"{row['sample_rate_range'][0]:.4f}-{row['sample_rate_range'][1]:.4f}; "
              + (f"transition table released at noise {row['transitions_noise_multiplier']:g} (epsilon "
                 f"<= {row['transitions_epsilon_max']:.3f} of the total); " if "transitions_epsilon_max" in row else "")
              + f"{wall / 60:.1f} min" + (f"; {results['served_weights']}, the last iterate: NDCG@10 "
                                        f"{results['test_last_iterate']['ndcg@10']:.4f}"
                                        if "test_last_iterate" in results else ""), flush=True)
    command = sys.argv if argv is None else ["benchmarks/privacy_utility.py", *argv]
    out = {"name": args.name, "dataset": args.dataset, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(command), "unit_of_privacy": "one user's whole history at their client",
           "protects_against": "the server, the other clients and anyone with the model" + (
               " (distributed noise: as long as secure aggregation holds, the other clients add their noise "
               "shares and the server with fewer than t of them faces the whole noise; docs/privacy.md)"
               if distributed else ""),
           "baseline_no_dp": baseline["test"] if baseline else None, "popularity": popularity, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    target = args.out_dir / f"privacy-utility-{args.name}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, baseline["test"] if baseline else None, popularity, args.out_dir / f"privacy-utility-{args.name}.png",
         f"{args.dataset}: {args.name}")
    print(f"-> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
