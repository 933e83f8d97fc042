"""Two checkouts timed against each other on a busy machine: what the `--compare` benches share.

Each run is a fresh process of one checkout running a snippet that prints one JSON object of
the pass's own figures (its wall seconds and the CPU seconds of its process and of the processes
it started, imports not counted). Around the process this adds
`process_s` and `tree_cpu_s` (the same for the whole process, imports included) and `peak_mib`
(its peak memory, GNU time's: a child's own counter starts at its parent's). Versions run
alternately, so load that comes and goes falls on both; the spread of each ratio is taken over
the pairs of runs next to each other.

CPU seconds are the figure to trust on a shared machine: a pass that waits for a core takes
longer, but uses about the same CPU. They miss work done in processes nobody reaps (a Ray
cluster's workers).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_snippet(checkout: Path, code: str, *args: str) -> dict:
    """`code` in a fresh Python process of `checkout`; its last line of output (JSON) plus the
    process's wall and CPU seconds and peak memory."""
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1")
    with tempfile.NamedTemporaryFile("r") as peak:
        cpu, started = children_cpu(), time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak.name, sys.executable, "-c", code, *args],
                              env=env, cwd=checkout, capture_output=True, text=True)
        process_s, tree_cpu_s = time.perf_counter() - started, children_cpu() - cpu
        if proc.returncode != 0:
            raise SystemExit(f"the run from {checkout} failed:\n{proc.stderr[-3000:]}")
        peak_mib = int(peak.read().split()[-1]) / 1024
    return {**json.loads(proc.stdout.splitlines()[-1]), "process_s": process_s, "tree_cpu_s": tree_cpu_s,
            "peak_mib": peak_mib}


def alternate(versions: dict[str, Path], one_run: Callable[[str, Path], dict], runs: int) -> dict[str, list[dict]]:
    """`runs` rounds of one run of each version in turn (the order swapped every round), after one
    round not counted (caches and the page cache warm for all alike)."""
    results: dict[str, list[dict]] = {v: [] for v in versions}
    order = list(versions.items())
    for version, checkout in order:
        one_run(version, checkout)
    for r in range(runs):
        for version, checkout in order if r % 2 == 0 else order[::-1]:
            results[version].append(one_run(version, checkout))
    return results


def summarize(results: dict[str, list[dict]], baseline: str = "old") -> dict:
    """Medians of each figure per version, and for every other version its ratio to `baseline`
    (above 1: slower), the median of the rounds' ratios with their quartiles (None where the
    baseline's figure was 0 in every round)."""
    figures = list(results[baseline][0])
    out: dict = {}
    for version, runs in results.items():
        out[version] = {f: round(statistics.median(r[f] for r in runs), 3) for f in figures}
    for version, runs in results.items():
        if version == baseline:
            continue
        ratios = {}
        for f in figures:
            each = sorted(r[f] / b[f] for r, b in zip(runs, results[baseline]) if b[f])
            if not each:
                ratios[f] = None
                continue
            q1, median, q3 = statistics.quantiles(each, n=4) if len(each) > 1 else each * 3
            ratios[f] = {"median": round(median, 3), "q1": round(q1, 3), "q3": round(q3, 3)}
        out[f"{version}_vs_{baseline}"] = ratios
    return out
