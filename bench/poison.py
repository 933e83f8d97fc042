"""Benchmark: a pass with one poison file in it against the same pass without; prints JSON.

A poison file kills the process that decodes it (here, for real: a segfault in C through
curate.images' test hook, CURATE_TEST_CRASH=segv). The local engine's pass process dies, is
started again and goes on; the file gets a `worker_died` row. This times `curate ingest`
and then `curate hash` over N synthetic JPEGs, in fresh processes as a user runs them,
alternating the clean and the poisoned corpus (the hook is on for both, so they differ only
in the one file), and gives each median and the ratio poisoned / clean with its quartiles
over adjacent runs (bench/versions.py): what one crash costs a run, in wall seconds and in
CPU seconds of the command and the processes it started (what a busy machine changes least).

    python bench/poison.py [--images 1000] [--side 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import write_images  # noqa: E402
from bench.versions import alternate, children_cpu, summarize  # noqa: E402
from curate.images import CRASH_MARKER  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(*args: str) -> tuple[float, float]:
    """Wall and CPU seconds `curate ARGS` takes in a fresh process (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CURATE_TEST_CRASH": "segv"}
    cpu, started = children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "curate", *args, "-q"], env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - started, children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"curate {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return seconds, cpu


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

        def one_run(name: str, src: Path) -> dict:
            ds = work / f"ds-{name}"
            figures = {}
            for command, args_ in (("ingest", (str(src), str(ds))), ("hash", (str(ds),))):
                figures[f"{command}_s"], figures[f"{command}_cpu_s"] = timed(command, *args_)
            shutil.rmtree(ds)
            return figures

        runs = alternate({"clean": clean, "poisoned": poisoned}, one_run, args.repeats)
        print(json.dumps({"images": args.images, "side": args.side, "repeats": args.repeats, "engine": "local",
                          **summarize(runs, baseline="clean")}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
