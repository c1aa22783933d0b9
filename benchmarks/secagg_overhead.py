"""Secure aggregation cost: round time secure vs plain in the same script, and the protocol's own
cost per client as the federation grows.

    # round time on Flower's simulation engine, ML-1M split IID over 10 / 50 / 100 clients
    python benchmarks/secagg_overhead.py rounds --name ml1m --dataset ml-1m --clients 10 50 100
    # the same with a ~2M-parameter model
    python benchmarks/secagg_overhead.py rounds --name ml1m-2m --dataset ml-1m --clients 10 50 100 \
        --set model.d_model=224
    # the protocol alone (no Flower, no training): seconds and bytes per client for n clients
    python benchmarks/secagg_overhead.py protocol --length 282048 --clients 10 50 100 200 500 1000

``rounds``: for every client count, a plain run and a secure run (``privacy.secure_aggregation``
``off`` / ``on``; no DP, so that both train exactly the same and the final models can be compared),
alternating plain, secure, plain, secure for ``--reps`` repetitions. Each run is ``--rounds`` rounds
of one local epoch; a round's time is the server's ``train_seconds`` (send, train, aggregate;
evaluation excluded), and round 1 (Ray's start-up) is left out. Quoted: the median over rounds and
repetitions per arm and their ratio; the secure rounds' own stage times; the largest difference
between the two arms' models after round 1 (the same inputs aggregated two ways) against the
quantization tolerance, and after the last round (local Adam amplifies float-level differences).

``protocol``: runs SecAgg+ (``privacy/secagg.py``) in one process for n clients with a vector of
``--length`` values and the default graph (degree ~ 3 log2 n): per-client seconds of all client
stages (median over clients), bytes each client sends, server seconds.

Writes ``benchmarks/results/secagg-<name>.json`` (``rounds``) or ``secagg-protocol.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated import data_settings  # noqa: E402  (benchmarks/federated.py, this script's folder)
from core_model.config import load_config  # noqa: E402

DATASETS = {"ml-1m": ("ml-1m", "ml-1m"), "ml-100k": ("ml-100k", "ml-100k"), "synthetic": ("synthetic", "")}


def _nbytes(value: object) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _nbytes(v) for k, v in value.items())
    return 8  # an int or a float


def protocol(args: argparse.Namespace) -> int:
    from privacy.secagg import Quantizer, SecAggClient, SecAggServer, choose_graph

    rows = []
    rng = np.random.default_rng(0)
    for n in args.clients:
        quantizer = Quantizer(1.0, max_clients=n)
        vectors = {cid: quantizer.quantize(rng.uniform(-1, 1, args.length)) for cid in range(1, n + 1)}
        graph = choose_graph(list(vectors))
        server = SecAggServer(graph, round_id=1, vector_length=args.length)
        clients = {cid: SecAggClient(cid, 1) for cid in vectors}
        seconds = {cid: 0.0 for cid in vectors}
        sent = {cid: 0 for cid in vectors}
        server_seconds = 0.0

        def run_clients(requests: dict, stage: str) -> dict:
            replies = {}
            for cid, request in requests.items():
                t0 = time.perf_counter()
                client = clients[cid]
                if stage == "advertise_keys":
                    reply = client.advertise_keys(request)
                elif stage == "share_keys":
                    reply = client.share_keys(request)
                elif stage == "masked_input":
                    reply = client.masked_input(request, vectors[cid])
                else:
                    reply = client.unmask(request)
                seconds[cid] += time.perf_counter() - t0
                sent[cid] += _nbytes(reply)
                replies[cid] = reply
            return replies

        t0 = time.perf_counter()
        requests = server.advertise_keys()
        server_seconds += time.perf_counter() - t0
        for stage, step in (("advertise_keys", server.share_keys), ("share_keys", server.masked_input),
                            ("masked_input", server.unmask)):
            replies = run_clients(requests, stage)
            t0 = time.perf_counter()
            requests = step(replies)
            server_seconds += time.perf_counter() - t0
        replies = run_clients(requests, "unmasking")
        t0 = time.perf_counter()
        total, _ = server.aggregate(replies)
        server_seconds += time.perf_counter() - t0
        expected = np.zeros(args.length, dtype=np.uint64)
        for v in vectors.values():
            expected += v
        if not np.array_equal(total, expected):
            raise RuntimeError(f"n={n}: the secure sum is not the sum of the inputs")
        row = {"clients": n, "degree": graph.degree, "threshold": graph.threshold,
               "client_seconds_median": statistics.median(seconds.values()),
               "client_seconds_max": max(seconds.values()),
               "client_bytes_sent_median": statistics.median(sent.values()),
               "masked_vector_bytes": 8 * args.length,
               "client_key_and_share_bytes_median": statistics.median(sent.values()) - 8 * args.length,
               "server_seconds": server_seconds}
        rows.append(row)
        print(f"n={n:5d} degree {graph.degree:3d} t {graph.threshold:3d}: client {row['client_seconds_median']:.3f} s "
              f"(max {row['client_seconds_max']:.3f}), sends {row['client_bytes_sent_median'] / 1e6:.2f} MB "
              f"({row['client_key_and_share_bytes_median'] / 1e3:.1f} kB besides the masked vector); "
              f"server {server_seconds:.2f} s", flush=True)
    out = {"mode": "protocol", "length": args.length, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "rows": rows}
    target = args.out_dir / "secagg-protocol.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {target}")
    return 0


def _final_state(run_dir: Path) -> dict[str, np.ndarray]:
    from core_model.train import load_checkpoint

    model, _ = load_checkpoint(run_dir / "model.pt")
    return {k: v.numpy() for k, v in model.shareable_state().items()}


def rounds(args: argparse.Namespace) -> int:
    from simulations.runner import simulate

    base = data_settings(*DATASETS[args.dataset], args.data_root)
    if base is None:
        return 2
    root = args.run_root or ROOT / "runs" / f"secagg-{args.name}"
    rows = []
    for n in args.clients:
        times: dict[str, list[float]] = {"plain": [], "secure": []}
        stages: list[dict[str, float]] = []
        finals: dict[str, dict[str, np.ndarray]] = {}
        first: dict[str, dict[str, np.ndarray]] = {}
        params = 0
        for rep in range(args.reps):
            for arm in ("plain", "secure"):
                cfg = load_config(None, [
                    *base, "federation.partition=iid", f"federation.num_clients={n}",
                    f"federation.num_rounds={args.rounds}", "federation.local_epochs=1",
                    f"federation.evaluate_every={args.rounds + 1}", "eval.sampled=true",
                    *args.overrides, f'privacy.secure_aggregation="{"on" if arm == "secure" else "off"}"'])
                run_dir = root / f"n{n}-{arm}-{rep}"
                records: list[dict] = []

                def on_round(record: dict, run_dir: Path = run_dir, arm: str = arm, rep: int = rep) -> None:
                    records.append(record)
                    if record["round"] == 1 and rep == 0:  # model.pt is rewritten every round before on_round
                        first[arm] = _final_state(run_dir)

                simulate(cfg, run_dir, on_round=on_round)
                later = [r for r in records if r["round"] > 1]
                times[arm] += [r["train_seconds"] for r in later]
                if arm == "secure":
                    stages += [r["secagg_seconds"] for r in later]
                    if any(r.get("secagg_aborted") for r in records):
                        raise RuntimeError(f"{run_dir}: a secure round aborted (see metrics.jsonl)")
                if rep == 0:
                    finals[arm] = _final_state(run_dir)
                    params = sum(v.size for v in finals[arm].values())
                print(f"n={n} {arm} rep {rep}: round seconds {[round(r['train_seconds'], 2) for r in later]}",
                      flush=True)
        diff = max(float(np.abs(finals["plain"][k] - finals["secure"][k]).max()) for k in finals["plain"])
        diff1 = max(float(np.abs(first["plain"][k] - first["secure"][k]).max()) for k in first["plain"])
        # each client's n_k (w_k - w) is rounded to 2**-scale_bits (error <= half a step); the sum of
        # n such errors is divided by the users N >= n; adding the delta to w rounds in float32
        bits = load_config(None, args.overrides).privacy.secagg_scale_bits
        wmax = max(float(np.abs(v).max()) for v in first["plain"].values())
        tolerance = 2.0 ** -(bits + 1) + (n + 1) * 2.0 ** -24 * wmax
        plain, secure = statistics.median(times["plain"]), statistics.median(times["secure"])
        stage_medians = {k: statistics.median(s[k] for s in stages) for k in stages[0]} if stages else {}
        row = {"clients": n, "parameters": params, "plain_round_seconds": plain, "secure_round_seconds": secure,
               "ratio": secure / plain, "secure_stage_seconds_median": stage_medians,
               "rounds_timed_per_arm": len(times["plain"]), "round1_model_max_abs_diff": diff1,
               "round1_tolerance": tolerance, "final_model_max_abs_diff": diff}
        rows.append(row)
        print(f"n={n}: {params:,} parameters; plain {plain:.2f} s, secure {secure:.2f} s per round: "
              f"{row['ratio']:.2f}x; models after round 1 differ by at most {diff1:.2e} (quantization "
              f"tolerance {tolerance:.2e}), after round {args.rounds} by {diff:.2e}", flush=True)
    out = {"mode": "rounds", "name": args.name, "dataset": args.dataset, "overrides": args.overrides,
           "rounds": args.rounds, "reps": args.reps, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "rows": rows}
    target = args.out_dir / f"secagg-{args.name}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {target}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("protocol", help="the protocol alone, in one process")
    p.add_argument("--length", type=int, default=282048, help="values per client (282,048: the ML-1M model)")
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 200, 500, 1000])
    r = sub.add_parser("rounds", help="round time secure vs plain on the simulation engine")
    r.add_argument("--name", required=True)
    r.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    r.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    r.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    r.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is not timed)")
    r.add_argument("--reps", type=int, default=1, help="plain/secure pairs per client count")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--run-root", type=Path)
    for q in (p, r):
        q.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.mode == "rounds" and args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (round 1 is not timed), got {args.rounds}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return protocol(args) if args.mode == "protocol" else rounds(args)


if __name__ == "__main__":
    sys.exit(main())
