"""Training step time with glibc's default allocator behaviour vs ``core_model.allocator``.

    python benchmarks/allocator.py [--steps 6] [--reps 3] [--threads 2] [--out FILE.json]

Each arm runs in a fresh interpreter (``mallopt`` changes the whole process): ``system``
(``FEDREC_MALLOC=system``: glibc's defaults, every large block a fresh ``mmap``) and ``reuse``
(the default: freed memory kept and reused, see ``core_model/allocator.py``). An arm builds the
default SASRec for ML-1M's catalogue (3,416 items, d 64, 2 blocks, max_len 200) and takes
optimizer steps on one batch of 128 users with 200 positions each (random item ids: the tensor
shapes, not the data, set the allocator's work; 48 % of the default centralized run's draws are
such full-length users), bf16 autocast as in the default run. It reports seconds per step and,
per step, user and kernel CPU time and minor page faults, after 2 warm-up steps, and its peak
resident memory. The arms alternate ``--reps`` times; medians per arm and the ratio of the
medians are written to ``benchmarks/results/allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARM = """
import json, resource, sys, time
import torch
from core_model.allocator import keep_freed_memory
from core_model.model import ModelConfig, SASRec
from core_model.train import autocast, make_optimizer, TrainConfig
steps, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
applied = keep_freed_memory()
model = SASRec(ModelConfig(num_items=3416, max_len=200))
optimizer = make_optimizer(model, TrainConfig())
g = torch.Generator().manual_seed(0)
inputs = torch.randint(1, 3417, (128, 200), generator=g)
targets = torch.randint(1, 3417, (128, 200), generator=g)
def step():
    with autocast(torch.device("cpu"), "bf16"):
        _, loss = model(inputs, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(2):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "seconds_per_step": seconds / steps,
                  "user_seconds_per_step": (r1.ru_utime - r0.ru_utime) / steps,
                  "kernel_seconds_per_step": (r1.ru_stime - r0.ru_stime) / steps,
                  "page_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
                  "peak_rss_gb": r1.ru_maxrss / 1e6}))
"""


def run_arm(mode: str, steps: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["FEDREC_MALLOC"] = mode
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", ARM, str(steps), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "allocator.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"system": [], "reuse": []}
    for rep in range(args.reps):
        for mode in runs:
            result = run_arm(mode, args.steps, args.threads)
            runs[mode].append(result)
            print(f"rep {rep + 1} {mode}: {result}", flush=True)
    keys = ("seconds_per_step", "user_seconds_per_step", "kernel_seconds_per_step", "page_faults_per_step",
            "peak_rss_gb")
    medians = {mode: {k: statistics.median(r[k] for r in results) for k in keys} for mode, results in runs.items()}
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "libc": " ".join(platform.libc_ver())},
        "setting": {"steps": args.steps, "reps": args.reps, "threads": args.threads, "batch": [128, 200],
                    "items": 3416, "precision": "bf16"},
        "medians": medians,
        "speedup_reuse_vs_system": medians["system"]["seconds_per_step"] / medians["reuse"]["seconds_per_step"],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"medians": medians, "speedup": summary["speedup_reuse_vs_system"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
