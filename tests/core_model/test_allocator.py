"""keep_freed_memory: freed large blocks are reused without page faults; FEDREC_MALLOC is validated.

Each arm runs in a fresh interpreter (mallopt changes the whole process, and the faults of one arm
must not depend on what the test process allocated before).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from core_model.allocator import ENV, keep_freed_memory, malloc_mode, release_freed_memory

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, resource, sys
import torch
from core_model.allocator import keep_freed_memory, release_freed_memory
applied = keep_freed_memory()
def rss_pages():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])
n = 64 * 2**20 // 4  # 64 MB of float32: above glibc's largest mmap threshold (32 MB)
for _ in range(5):  # the first allocations grow the heap until its layout settles
    torch.ones(n).sum()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n).sum()  # allocate, touch every page, free
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
kept = rss_pages()
released = release_freed_memory()
print(json.dumps({"applied": applied, "median_faults": sorted(faults)[3], "released": released,
                  "rss_drop_pages": kept - rss_pages()}))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings apply to glibc only")


def run_probe(mode: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "GLIBC_TUNABLES")}
    if mode is not None:
        env[ENV] = mode
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    pages = 64 * 2**20 // 4096  # 16,384 pages per allocation
    system = run_probe("system")
    assert system["applied"] is False
    assert system["median_faults"] > pages / 2  # glibc's default: a fresh mmap, every page faulted again
    reuse = run_probe(None)  # the default
    assert reuse["applied"] is True
    assert reuse["median_faults"] < pages / 50
    # the kept 64 MB block is resident until release_freed_memory hands its pages back
    assert reuse["released"] is True and reuse["rss_drop_pages"] > pages / 2
    assert system["released"] is False


def test_mode_is_validated(monkeypatch):
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"FEDREC_MALLOC must be one of \('reuse', 'system'\), got 'jemalloc'"):
        malloc_mode()
    with pytest.raises(ValueError, match="FEDREC_MALLOC"):
        keep_freed_memory()


def test_system_mode_changes_nothing(monkeypatch):
    monkeypatch.setenv(ENV, "system")
    assert malloc_mode() == "system"
    assert keep_freed_memory() is False
    assert release_freed_memory() is False
    monkeypatch.delenv(ENV)
    assert malloc_mode() == "reuse"
