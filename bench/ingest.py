"""Benchmark: ingest and `curate hash` on both engines against a bare PIL loop.

Prints JSON: images/s of each pipeline, of a bare single-threaded PIL loop doing the
same work over the same files in the same run, their ratio (the pipeline's overhead;
above 1 means the pipeline's threads or tasks beat the bare loop), and the speed-up of
JPEG draft decoding on large photos. The files are synthetic photos, one in ten a PNG, and
a quarter of them exact copies of others (scraped folders hold many). For ingest the bare
loop reads, hashes and verifies each file the way ingest does (a copy of a file seen before
is not decoded; JPEGs at 1/8 scale, PNG chunk CRCs, nothing converted to RGB).

With `--compare DIR [DIR...]` (checkouts of other versions, old main first) every version
ingests the same files and hashes them, on each engine, in a fresh process a run, alternating
(bench/versions.py): each step's wall and CPU seconds (of the process and every process under
it, a Ray cluster's included; imports not counted), peak memory, and the ratios to old main
with their quartiles. `memory` is this version's peak at N and 4N files, which must not grow
with the corpus.

    python bench/ingest.py [--images 200] [--side 1024] [--engines local,ray] [--compare DIR...] [--runs 9]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.versions import alternate, run_snippet, summarize  # noqa: E402
from curate.images import decode  # noqa: E402
from curate.pipelines.executor import run  # noqa: E402
from curate.pipelines.ingest import ingest  # noqa: E402
from curate.pipelines.ray_executor import init_ray  # noqa: E402
from curate.pipelines.stats import StatsStage  # noqa: E402
from curate.store import Dataset  # noqa: E402


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, not like a flat test card."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([127 + 100 * np.sin(x / width * rng.uniform(1, 6) + y / height * rng.uniform(1, 6) + c)
                    for c in range(3)], -1)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: Path, n: int, side: int, duplicates: bool = True) -> list[Path]:
    """n files; with `duplicates`, every fourth is a copy of an earlier one."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    base = [photo(rng, side, side * 3 // 4) for _ in range(8)]
    paths = []
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 10 == 9 else ("JPEG", "jpg")
        if duplicates and i % 4 == 3:
            original = paths[i * 7 % i]
            path = folder / f"{i:05d}{original.suffix}"
            shutil.copyfile(original, path)
        else:
            path = folder / f"{i:05d}.{ext}"
            img = base[i % 8].rotate(i * 7 % 360) if i >= 8 else base[i].copy()
            # Base and angle repeat every 360 files: a pixel of its own makes every file different.
            img.putpixel((0, 0), (i & 255, i >> 8 & 255, i >> 16 & 255))
            img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def bare_ingest_loop(paths: list[Path]) -> float:
    """Images/s of plain PIL doing ingest's work: read, sha256, and for bytes not seen before
    open and verify (JPEG decoded at 1/8 scale, PNG chunk CRCs, others loaded)."""
    seen = set()
    started = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        img = Image.open(io.BytesIO(data))
        if img.format == "PNG":  # (its EXIF, when it precedes the pixels, is read at open)
            img.verify()
            continue
        img.getexif()
        if img.format == "JPEG":
            img.draft(img.mode, (1, 1))
        img.load()
    return len(paths) / (time.perf_counter() - started)


def bare_loop(paths: list[Path], min_side: int | None, stage=None) -> float:
    """Images/s of plain PIL: read, open, draft like the pipeline does, load, RGB, then (for a
    stage) the stage's own per-image maths: what is left is pipeline overhead."""
    started = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        if min_side and img.format == "JPEG":
            scale = min_side / min(img.size)
            img.draft("RGB", (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        img.load()
        rgb = img.convert("RGB")
        if stage is not None:
            stage.process(_one(stage.prepare({"image": _Decoded(rgb)})))
    return len(paths) / (time.perf_counter() - started)


class _Decoded:
    def __init__(self, image):
        self.image = image


def _one(prepared: dict) -> dict:
    return {k: [v] for k, v in prepared.items()}


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def draft_speedup(folder: Path, min_side: int = 512, n: int = 4) -> dict:
    rng = np.random.default_rng(1)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        photo(rng, 4000, 3000).save(buf, "JPEG", quality=92)
        blobs.append(buf.getvalue())
    full = timed(lambda: [decode(b) for b in blobs]) / n
    draft = timed(lambda: [decode(b, min_side=min_side) for b in blobs]) / n
    return {"image": "4000x3000 JPEG", "min_side": min_side, "full_ms": round(full * 1000, 1),
            "draft_ms": round(draft * 1000, 1), "speedup": round(full / draft, 2)}


# Ingest, then hash, in a fresh process of one version, on one engine (Ray: a local cluster,
# started and warmed up first); prints each step's seconds and the CPU seconds of the process
# tree (Ray's processes are under it)
PASSES = """import json, sys, time
from pathlib import Path
import psutil
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.ray_executor import init_ray
from curate.pipelines.stats import StatsStage
from curate.store import Dataset
def cpu():
    used = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            used += sum(p.cpu_times()[:4])  # its own and its reaped children's
        except psutil.NoSuchProcess:
            pass
    return used
folder, root, engine = sys.argv[1:]
if engine == "ray":
    init_ray()
    warm = Dataset(root + "-warm", create=True)
    ingest([str(p) for p in sorted(Path(folder).iterdir())[:4]], warm, show_progress=False, engine=engine)
    run(warm, StatsStage(), engine=engine, show_progress=False)
ds = Dataset(root, create=True)
out = {}
for step, work in (("ingest", lambda: ingest([folder], ds, show_progress=False, engine=engine)),
                   ("hash", lambda: run(ds, StatsStage(), engine=engine, show_progress=False))):
    used, started = cpu(), time.perf_counter()
    work()
    out |= {f"{step}_s": time.perf_counter() - started, f"{step}_cpu_s": cpu() - used}
print(json.dumps(out))
"""


def passes(checkout: Path, folder: Path, ds: Path, engine: str = "local") -> dict:
    """Ingest then hash of `folder` by `checkout` in a fresh process; its figures (bench/versions.py)."""
    for old in (ds, ds.with_name(ds.name + "-warm")):
        shutil.rmtree(old, ignore_errors=True)
    return run_snippet(checkout, PASSES, str(folder), str(ds), engine)


def compare(folder: Path, tmp: Path, others: list[Path], engines: list[str], runs: int) -> dict:
    """This version's ingest and hash against the other checkouts', alternating, per engine. Each
    run also does a quarter of the files: the difference per file is the cost without the fixed
    part (starting the pass, claiming the work), which is what a run of a million files pays."""
    files = sorted(folder.iterdir())
    quarter = tmp / "quarter"
    quarter.mkdir()
    for f in files[:len(files) // 4]:
        os.link(f, quarter / f.name)
    versions = {"new": REPO, **{p.name: p.resolve() for p in others}}

    def one_run(version: str, path: Path, engine: str) -> dict:
        whole, part = (passes(path, f, tmp / f"cmp-{version}", engine) for f in (folder, quarter))
        extra = len(files) - len(files) // 4
        return whole | {f"per_image_ms_{f}": (whole[f] - part[f]) * 1e3 / extra
                        for f in ("ingest_s", "ingest_cpu_s", "hash_s", "hash_cpu_s")}

    out = {}
    for engine in engines:
        results = alternate(versions, lambda v, path: one_run(v, path, engine), runs)
        out[engine] = summarize(results, baseline=others[0].name)
    return {"images": len(files), "runs": runs, "versions": {v: str(p) for v, p in versions.items()}, **out}


# A Ray cluster another process started, as a user's would be: it runs until its stdin closes
HEAD = """import os, sys, ray
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""
# `curate hash`'s pass on that cluster, from a fresh process: seconds from its start to its
# imports done, to joining, to the first batch of rows back, and to the last
JOINER = """import time
started = time.perf_counter()
import json, sys
from curate.pipelines.executor import Summary, Tally
from curate.pipelines.ray_executor import init_ray, run_ray
from curate.pipelines.stats import StatsStage
from curate.pipelines.work import Work
from curate.store import Dataset
imported = time.perf_counter()
init_ray(sys.argv[2])
joined = time.perf_counter()
ds, stage = Dataset(sys.argv[1]), StatsStage()
work = Work(ds, [stage])
todo = work.todo(None, None)
tally = Tally([stage], [Summary(stage.table, stage.model_key())], lambda n: None, None)
first, n = None, 0
with ds.owner() as owner:
    work.owner = owner.id
    for batch in run_ray(work, todo, None, tally):
        first = first or time.perf_counter()
        n += sum(rows.num_rows for _, rows in batch)
done = time.perf_counter()
print(json.dumps({"images": n, "imports_s": round(imported - started, 2), "join_s": round(joined - imported, 2),
                  "first_batch_s": round(first - started, 2), "all_s": round(done - started, 2)}))
"""


def join_cluster(ds: Path, runs: int = 2) -> list[dict]:
    """A command joining a running cluster: when its first batch comes back (from its start)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        address = head.stdout.readline().strip()
        return [json.loads(subprocess.run([sys.executable, "-c", JOINER, str(ds), address], env=env, check=True,
                                          capture_output=True, text=True).stdout.splitlines()[-1])
                for _ in range(runs)]
    finally:
        head.stdin.close()
        head.wait(timeout=120)


def memory(tmp: Path, n: int, side: int) -> dict:
    """This version's peak MiB ingesting and hashing n and 4n different files: it must not grow with the corpus."""
    out = {}
    for k in (n, 4 * n):
        folder = tmp / f"mem-{k}"
        write_images(folder, k, side, duplicates=False)
        mib = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        figures = passes(REPO, folder, tmp / f"mem-ds-{k}")
        out[f"{k}_files"] = {"corpus_mib": round(mib), "ingest_s": round(figures["ingest_s"], 2),
                             "peak_mib": round(figures["peak_mib"])}
        shutil.rmtree(folder)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=1024, help="width of the generated photos")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--compare", type=Path, nargs="+", help="other checkouts (old main first) to run the same "
                        "ingest and hash from")
    parser.add_argument("--runs", type=int, default=9, help="runs of each version with --compare")
    parser.add_argument("--memory", type=int, default=0, help="peak memory ingesting this many files and 4x as many")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "images", args.images, args.side)
        n = len(paths)
        # Warm the page cache and imports, so the first contestant pays no extra.
        bare_loop(paths[:10], 1)
        result = {"images": n, "size": f"{args.side}x{args.side * 3 // 4}", "cpus": os.cpu_count()}
        bare_ingest = bare_ingest_loop(paths)
        bare_hash = bare_loop(paths, StatsStage.decode_min_side, stage=StatsStage())
        result["bare_pil"] = {"ingest_like_images_per_s": round(bare_ingest, 1),
                              "hash_like_images_per_s": round(bare_hash, 1)}
        for engine in engines:
            if engine == "ray":  # started only now: its idle processes would take the local engine's cores
                init_ray()  # starting the cluster is not part of any command's figure
            # Each command pays fixed costs (Ray starts worker processes and a model actor,
            # and imports our modules in each); a real run has a million images. So each
            # engine runs a small set, then the full set: the difference is the per-image
            # (marginal) rate, the figure that matters at scale, next to the plain rate.
            warm = Dataset(tmp / f"warm-{engine}", create=True)  # first use: Ray starts its workers
            ingest([str(p) for p in paths[:4]], warm, show_progress=False, engine=engine)
            run(warm, StatsStage(), engine=engine, show_progress=False)
            small = Dataset(tmp / f"small-{engine}", create=True)
            k = max(1, n // 4)
            t_ingest_small = timed(lambda: ingest([str(p) for p in paths[:k]], small, show_progress=False,
                                                  engine=engine))
            t_hash_small = timed(lambda: run(small, StatsStage(), engine=engine, show_progress=False))
            ds = Dataset(tmp / f"ds-{engine}", create=True)
            t_ingest = timed(lambda: ingest([str(tmp / "images")], ds, show_progress=False, engine=engine))
            t_hash = timed(lambda: run(ds, StatsStage(), engine=engine, show_progress=False))
            # None when noise (other load on the machine) made the small run the slower one.
            marginal_ingest = (n - k) / (t_ingest - t_ingest_small) if t_ingest > t_ingest_small else None
            marginal_hash = (n - k) / (t_hash - t_hash_small) if t_hash > t_hash_small else None
            result[engine] = {
                "ingest_images_per_s": round(n / t_ingest, 1),
                "ingest_vs_bare": round(n / t_ingest / bare_ingest, 2),
                "ingest_marginal_images_per_s": _round(marginal_ingest),
                "ingest_marginal_vs_bare": _round(marginal_ingest and marginal_ingest / bare_ingest, 2),
                "hash_images_per_s": round(n / t_hash, 1),
                "hash_vs_bare": round(n / t_hash / bare_hash, 2),
                "hash_marginal_images_per_s": _round(marginal_hash),
                "hash_marginal_vs_bare": _round(marginal_hash and marginal_hash / bare_hash, 2),
            }
        if {"local", "ray"} <= set(engines):  # per image, the figure that matters at scale
            result["ray_vs_local_per_image"] = {
                step: _round(result["ray"][f"{step}_marginal_images_per_s"] and result["local"][
                    f"{step}_marginal_images_per_s"] and result["ray"][f"{step}_marginal_images_per_s"] /
                    result["local"][f"{step}_marginal_images_per_s"], 2) for step in ("ingest", "hash")}
        if "ray" in engines:
            import ray

            ray.shutdown()  # the cluster of this process; a command joins another's below
            joining = Dataset(tmp / "join", create=True)
            ingest([str(tmp / "images")], joining, show_progress=False)
            result["ray_join_running_cluster"] = join_cluster(joining.root)
        if args.compare:
            result["compare"] = compare(tmp / "images", tmp, args.compare, engines, args.runs)
        if args.memory:
            result["memory"] = memory(tmp, args.memory, args.side)
        result["draft_decoding"] = draft_speedup(tmp)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
