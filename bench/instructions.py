"""Instructions per image of ingest and hash, this checkout against others (valgrind's callgrind).

CPU seconds on a shared machine move a few percent run to run; the instructions a run executes
barely move, so a difference of 1% shows in one run of each. Each version ingests N and then
3N synthetic photos (bench/ingest.py's) and hashes them, each step in a fresh process under
callgrind, counting every process of the run (the local engine's pass runs in a forked child:
callgrind's counters are dumped before every fork, so the child counts only its own work).
Per image is the difference between the two sizes over 2N: what a run of a million images pays
for each; `pass` is the whole step at N, less a process that imports the same and does nothing.
About a minute of one core per 200 images and step.

    python bench/instructions.py --compare OLD_CHECKOUT [--images 200]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest import write_images  # noqa: E402

STEP = """import shutil, sys
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.store import Dataset
step, folder, root = sys.argv[1:]
if step == "ingest":
    shutil.rmtree(root, ignore_errors=True)
    ingest([folder], Dataset(root, create=True), show_progress=False)
elif step == "hash":
    ds = Dataset(root)
    shutil.rmtree(ds.table_dir("stats"), ignore_errors=True)
    run(ds, StatsStage(), show_progress=False)
"""


def instructions(checkout: Path, step: str, folder: Path, ds: Path, out: Path) -> int:
    """Instructions of `step` ("none": imports only) in a fresh process of `checkout`, summed
    over its processes and callgrind's dumps."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run(["valgrind", "--tool=callgrind", "--dump-before=*fork", f"--callgrind-out-file={out}/%p",
                    sys.executable, "-c", STEP, step, str(folder), str(ds)],
                   env=dict(os.environ, PYTHONPATH=str(checkout)), cwd=checkout, check=True, capture_output=True)
    return sum(int(line.split()[1]) for f in out.iterdir() for line in f.read_text().splitlines()
               if line.startswith("totals:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, nargs="+", required=True, help="other checkouts (old main first)")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    versions = {"new": REPO, **{p.name: p.resolve() for p in args.compare}}
    n = args.images
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "images", 3 * n, 1024)
        small = tmp / "small"
        small.mkdir()
        for p in paths[:n]:
            os.link(p, small / p.name)
        result: dict = {"images": [n, 3 * n], "size": "1024x768"}
        for version, checkout in versions.items():
            def count(step: str, folder: Path) -> int:
                return instructions(checkout, step, folder, tmp / f"ds-{version}-{folder.name}", tmp / "callgrind")

            idle = count("none", small)
            figures = {}
            for step in ("ingest", "hash"):  # hash reads what ingest wrote
                at_n, at_3n = count(step, small), count(step, tmp / "images")
                figures[f"{step}_per_image"] = round((at_3n - at_n) / (2 * n))
                figures[f"{step}_pass"] = at_n - idle
            result[version] = {"imports": idle, **figures}
        old = result[args.compare[0].name]
        for version in versions:
            if version != args.compare[0].name:
                result[f"{version}_vs_{args.compare[0].name}"] = {k: round(v / old[k], 4)
                                                                  for k, v in result[version].items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
