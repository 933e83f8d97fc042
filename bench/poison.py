"""Benchmark: a pass with one poison file in it against the same pass without; prints JSON.

A poison file kills the process that decodes it (here, for real: a segfault in C through
curate.images' test hook, CURATE_TEST_CRASH=segv). The local engine's pass process dies, is
started again and goes on; the file gets a `worker_died` row. This times `curate ingest`
and then `curate hash` over N synthetic JPEGs, in fresh processes as a user runs them,
alternating the clean and the poisoned corpus (the hook is on for both, so they differ only
in the one file), and gives each median and the ratio poisoned / clean: what one crash
costs a run.

    python bench/poison.py [--images 1000] [--side 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import write_images  # noqa: E402
from curate.images import CRASH_MARKER  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(*args: str) -> float:
    """Seconds `curate ARGS` takes in a fresh process (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CURATE_TEST_CRASH": "segv"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "curate", *args, "-q"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"curate {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=512, help="width of the generated photos")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="curate-poison-"))
    try:
        clean = work / "clean"
        paths = write_images(clean, args.images, args.side, duplicates=False)
        poisoned = work / "poisoned"
        shutil.copytree(clean, poisoned)
        victim = poisoned / paths[len(paths) // 2].relative_to(clean)
        victim.write_bytes(victim.read_bytes() + CRASH_MARKER)  # a valid JPEG that crashes its decoder
        seconds: dict[str, dict[str, list[float]]] = {"ingest": {"clean": [], "poisoned": []},
                                                      "hash": {"clean": [], "poisoned": []}}
        for r in range(args.repeats):
            for name, src in (("clean", clean), ("poisoned", poisoned)):
                ds = work / f"ds-{name}-{r}"
                seconds["ingest"][name].append(timed("ingest", str(src), str(ds)))
                seconds["hash"][name].append(timed("hash", str(ds)))
                shutil.rmtree(ds)
        result = {"images": args.images, "side": args.side, "repeats": args.repeats, "engine": "local"}
        for command, runs in seconds.items():
            clean_s, poisoned_s = statistics.median(runs["clean"]), statistics.median(runs["poisoned"])
            result[command] = {"clean_s": round(clean_s, 2), "poisoned_s": round(poisoned_s, 2),
                               "poisoned_vs_clean": round(poisoned_s / clean_s, 3)}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
