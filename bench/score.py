"""Benchmark of the scoring pass; prints JSON.

CPU (default): the full pass (CLIP + WD14 + OWLv2 from one decode, then the quality head)
with the tiny zoo on synthetic photo-sized JPEGs, against a bare loop that reads and
decodes the same files at the same draft size with the same number of decode threads. The
ratio says how much of the decode-bound throughput the pass keeps.

--workers: what the CPU workers do per image at real sizes (ViT-B-32 at 224, a WD ViT at
448, OWLv2 at 960) on 12 MP photos, on one core: decoding against decoding plus the shared
resize and the three models' preparation. On a GPU machine this bounds how fast the workers
can feed the models.

--compare DIR [DIR...]: the same CPU pass from this checkout and from each other checkout (old
main first: the others' ratios are to it), in fresh processes, alternating (bench/versions.py):
the pass's wall and CPU seconds per version and the ratios with their quartiles.

--real-size: real-size architectures with random weights (ViT-B-32 at 224, a WD ViT-B at
448, OWLv2 base at 960) on --device (cuda: bf16), model-only images/s per model, FLOPs per
image (torch's FlopCounterMode) and the fraction of the bf16 peak (--peak-tflops, by
default from the GPU's name) that this reaches; then --workers on this machine, and the
pass's bound: the slower of the models and the decode threads' feed.

    python bench/score.py [--images 96] [--size 1536x1024]
    python bench/score.py --compare DIR [DIR...] [--runs 9]
    python bench/score.py --workers [--images 8] [--size 4000x3000]
    python bench/score.py --real-size --device cuda [--batch 64]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def write_images(folder: Path, n: int, width: int, height: int) -> None:
    import numpy as np

    from curate.cli.demo import synthetic_image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        w, h = (width, height) if i % 2 else (height, width)  # landscape and portrait
        synthetic_image(rng, w, h).save(folder / f"{i:04d}.jpg", quality=90)


def cpu_bench(args) -> dict:
    from curate.images import decode, decode_threads, read_file
    from curate.models.tiny import write_zoo
    from curate.pipelines.executor import decode_need
    from curate.pipelines.ingest import ingest
    from curate.pipelines.score import image_stages, score
    from curate.store import Dataset

    width, height = map(int, args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        write_images(root / "images", args.images, width, height)
        ds = Dataset(root / "ds", create=True)
        ingest([str(root / "images")], ds, show_progress=False)
        zoo = write_zoo(root / "zoo", ["open_clip", "quality_head", "wd14", "owlv2"])
        models = dict(clip=str(zoo["open_clip"]), tagger=f"wd14:{zoo['wd14']}", watermark=f"owlv2:{zoo['owlv2']}")
        need = decode_need(image_stages(**models))
        files = sorted((root / "images").iterdir())
        workers = decode_threads()  # as the local engine

        def bare_decode() -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                for decoded in pool.map(lambda f: decode(read_file(f), min_side=need[0], long_side=need[1]), files):
                    decoded.image.load()
            return time.perf_counter() - started

        def full_pass(where=None) -> tuple[float, list]:
            for table in ("embeddings", "tags", "watermarks", "quality"):
                shutil.rmtree(ds.table_dir(table), ignore_errors=True)
            started = time.perf_counter()
            summaries = score(ds, **models, quality=str(zoo["quality_head"]), where=where, show_progress=False)
            return time.perf_counter() - started, summaries

        with contextlib.redirect_stderr(io.StringIO()):
            full_pass()  # warm-up: imports, first model loads
            bare_decode()
            decode_s = min(bare_decode() for _ in range(args.repeats))
            pass_s, summaries = min((full_pass() for _ in range(args.repeats)), key=lambda r: r[0])
            # a quarter of the images (by hash prefix): the difference is the per-image cost
            # without the fixed part (model loads, choosing the input)
            quarter_s, quarter = min((full_pass("image_id < '4'") for _ in range(args.repeats)), key=lambda r: r[0])
        n = len(files)
        extra = n - quarter[0].todo
        marginal = extra / (pass_s - quarter_s) if pass_s > quarter_s and extra else None
        return {
            "device": "cpu", "cpu_cores": os.cpu_count(), "images": n, "image_size": args.size,
            "decode_min_side": need[0], "decode_long_side": need[1], "decode_threads": workers,
            "bare_decode_images_per_s": round(n / decode_s, 1),
            "pass_images_per_s": round(n / pass_s, 1),
            "overhead_ratio": round(decode_s / pass_s, 3),
            "pass_marginal_images_per_s": round(marginal, 1) if marginal else None,
            "marginal_overhead_ratio": round(marginal * decode_s / n, 3) if marginal else None,
            "pass_fixed_seconds": round(pass_s - n / marginal, 2) if marginal else None,
            "stages": {s.stage: {"model": s.model, "ok": s.ok, "errors": dict(s.errors)} for s in summaries},
            "note": "pass = CLIP + WD14 + OWLv2 from one decode, then the quality head, tiny zoo, end to end "
                    "(model setup included); overhead_ratio = pass images/s over bare decode images/s; marginal = "
                    "per-image rate from the full run minus a quarter-size run (null when load noise inverts them)",
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


# One version's dataset and tiny zoo, written by its own code; prints the models' values
COMPARE_SETUP = """import json, sys
from pathlib import Path
from curate.models.tiny import write_zoo
from curate.pipelines.ingest import ingest
from curate.store import Dataset
ds = Dataset(sys.argv[2], create=True)
ingest([sys.argv[1]], ds, show_progress=False)
zoo = write_zoo(sys.argv[3], ["open_clip", "quality_head", "wd14", "owlv2"])
print(json.dumps({"models": dict(clip=str(zoo["open_clip"]), tagger=f"wd14:{zoo['wd14']}",
                                 watermark=f"owlv2:{zoo['owlv2']}", quality=str(zoo["quality_head"]))}))
"""
# The scoring pass of one version on its dataset (its tables removed first), over the rows
# `where` selects (all: '')
COMPARE_PASS = """import json, resource, shutil, sys, time
from curate.pipelines.score import score
from curate.store import Dataset
def cpu():
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))
ds = Dataset(sys.argv[1])
for table in ("embeddings", "tags", "watermarks", "quality"):
    shutil.rmtree(ds.table_dir(table), ignore_errors=True)
used, started = cpu(), time.perf_counter()
summaries = score(ds, **json.loads(sys.argv[2]), where=sys.argv[3] or None, show_progress=False)
print(json.dumps({"s": time.perf_counter() - started, "cpu_s": cpu() - used, "images": summaries[0].todo}))
"""


def compare_bench(args) -> dict:
    """The CPU pass of this checkout against other checkouts', alternating (see bench/versions.py)."""
    from bench.versions import alternate, run_snippet, summarize

    width, height = map(int, args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="bench-score-compare-"))
    try:
        write_images(root / "images", args.images, width, height)
        versions = {"new": Path(__file__).resolve().parents[1], **{p.name: p.resolve() for p in args.compare}}
        models = {v: run_snippet(path, COMPARE_SETUP, str(root / "images"), str(root / f"ds-{v}"),
                                 str(root / f"zoo-{v}"))["models"] for v, path in versions.items()}

        def one_run(version: str, path: Path) -> dict:
            """The whole pass and a quarter of it; the difference per image is the pass's cost without
            its fixed part (imports, model loads), which is what a run of a million images pays."""
            full, quarter = (run_snippet(path, COMPARE_PASS, str(root / f"ds-{version}"), json.dumps(models[version]),
                                         where) for where in ("", "image_id < '4'"))
            extra = full.pop("images") - quarter.pop("images")
            return full | {f"per_image_ms_{f}": (full[f] - quarter[f]) * 1e3 / extra for f in ("s", "cpu_s")}

        results = alternate(versions, one_run, args.runs)
        return {"images": args.images, "image_size": args.size, "cpu_cores": os.cpu_count(), "runs": args.runs,
                "versions": {v: str(p) for v, p in versions.items()},
                **summarize(results, baseline=args.compare[0].name),
                "note": "the scoring pass (CLIP + WD14 + OWLv2, then the quality head, tiny zoo, model loads "
                        "included) in a fresh process per run; s, cpu_s: the pass's; process_s, tree_cpu_s: the "
                        "whole process's, imports included; per_image_ms: the whole pass minus a quarter-size pass "
                        "(image_id < '4'), per image more; ratios: median and quartiles over adjacent runs"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def real_size_stages(folder: Path) -> list:
    """The pass's model adapters at real input sizes. preprocess() reads only the configs, so no weights
    are made: open_clip's own ViT-B-32 config, a WD14 ONNX whose graph only declares its
    448 input, an OWLv2 config at 960."""
    import onnx
    from onnx import TensorProto, helper

    from curate.models.clip import Clip
    from curate.models.owlv2 import OWLv2
    from curate.models.tiny_scoring import write_selected_tags
    from curate.models.wd14 import WD14

    (folder / "wd14").mkdir(parents=True)
    pixels = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 448, 448, 3])
    same = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 448, 448, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "size-only", [pixels], [same])
    onnx.save(helper.make_model(graph), str(folder / "wd14" / "model.onnx"))
    write_selected_tags(folder / "wd14" / "selected_tags.csv")
    (folder / "owlv2").mkdir()
    (folder / "owlv2" / "config.json").write_text(json.dumps({"model_type": "owlv2",
                                                              "vision_config": {"image_size": 960}}))
    return [Clip("ViT-B-32:laion2b_s34b_b79k"), WD14(str(folder / "wd14")), OWLv2(str(folder / "owlv2"))]


def worker_bench(args) -> dict:
    from curate.images import decode, quick_gil_handoffs, read_file, shrink
    from curate.pipelines.executor import decode_need

    width, height = map(int, args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        write_images(root / "images", args.images, width, height)
        stages = real_size_stages(root / "models")
        need = decode_need(stages)
        files = sorted((root / "images").iterdir())

        def cpu_ms(step, inputs) -> tuple[float, list]:
            """Best of --repeats: this thread's CPU ms per input (other load on the machine barely moves it)."""
            best, out = float("inf"), []
            for _ in range(args.repeats):
                started = time.thread_time()
                out = [step(x) for x in inputs]
                best = min(best, (time.thread_time() - started) * 1e3 / len(inputs))
            return best, out

        def work(file) -> None:
            image = shrink(decode(read_file(file), min_side=need[0], long_side=need[1]), *need)
            for s in stages:
                s.preprocess(image)

        def wall_ms(busy: bool) -> float:
            """Best of --repeats: wall ms per image of the whole work on this thread, next to a
            thread that runs Python without pause (busy) or alone, with the pass's GIL setting."""
            stop = threading.Event()

            def spin() -> None:
                while not stop.is_set():
                    pass

            best = float("inf")
            with quick_gil_handoffs():
                if busy:
                    threading.Thread(target=spin, daemon=True).start()
                try:
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        for file in files:
                            work(file)
                        best = min(best, time.perf_counter() - started)
                finally:
                    stop.set()
            return best * 1e3 / len(files)

        decode_ms, decoded = cpu_ms(lambda f: decode(read_file(f), min_side=need[0], long_side=need[1]), files)
        shrink_ms, shrunk = cpu_ms(lambda d: shrink(d, *need), decoded)
        prepare_ms = {type(s).__name__: cpu_ms(lambda d: s.preprocess(d), shrunk)[0] for s in stages}
        pass_ms = decode_ms + shrink_ms + sum(prepare_ms.values())
        alone_ms, busy_ms = wall_ms(busy=False), wall_ms(busy=True)
        return {
            "mode": "workers", "images": len(files), "image_size": args.size,
            "jpeg_kb": round(sum(f.stat().st_size for f in files) / len(files) / 1024),
            "decode_min_side": need[0], "decode_long_side": need[1],
            "decoded_size": "x".join(map(str, decoded[0].image.size)),
            "shrunk_size": "x".join(map(str, shrunk[0].image.size)),
            "cpu_ms_per_image": {"read_and_decode": round(decode_ms, 2), "shrink": round(shrink_ms, 2),
                                 **{f"prepare_{k}": round(v, 2) for k, v in prepare_ms.items()}},
            "decode_images_per_s_per_core": round(1e3 / decode_ms, 1),
            "worker_images_per_s_per_core": round(1e3 / pass_ms, 1),
            "worker_ratio": round(decode_ms / pass_ms, 3),
            "worker_wall_ms_alone": round(alone_ms, 2), "worker_wall_ms_next_to_busy_python": round(busy_ms, 2),
            "busy_python_slowdown": round(busy_ms / alone_ms, 3),
            "note": "CPU time of one thread per image; worker = read + decode + shrink + the three prepares, "
                    "which is what each CPU worker of the pass does while the models run on the GPU; "
                    "next_to_busy_python: its wall time while another thread holds the GIL whenever it can "
                    "(the worst the model loop's Python does to the decode threads)",
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def real_size_models(device, dtype):
    """(name, input size, batch -> model forward) for random-weight real-size architectures."""
    import open_clip
    import timm
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    clip = open_clip.create_model("ViT-B-32").visual.to(device, dtype).eval()
    wd = timm.create_model("vit_base_patch16_224", img_size=448, num_classes=10861, class_token=False,
                           global_pool="avg", fc_norm=False, act_layer="gelu_tanh").to(device, dtype).eval()
    owl = Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960, "patch_size": 16}))
    owl = owl.to(device, dtype).eval()

    def owl_forward(pixels):
        ids = torch.full((len(pixels), 16), 0, dtype=torch.long, device=device)
        ids[:, :5] = torch.tensor([49406, 320, 2505, 2110, 49407])  # "a watermark"
        return owl(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long())

    return [("clip_vit_b_32", 224, clip), ("wd_vit_b_448", 448, wd), ("owlv2_base_960", 960, owl_forward)]


def real_size_bench(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from curate.devices import choose
    from curate.images import decode_threads

    device, dtype = choose(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    out = {"device": name, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "models": {}}
    rates = []
    for model_name, size, forward in real_size_models(device, dtype):
        pixels = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
        # counted with autograd on: in inference mode attention takes fused kernels the counter misses
        with FlopCounterMode(display=False) as counter:
            forward(pixels[:1])
        flops = counter.get_total_flops()
        with torch.inference_mode():
            for _ in range(args.warmup):
                forward(pixels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.iters):
                forward(pixels)
            if device.type == "cuda":
                torch.cuda.synchronize()
        rate = args.batch * args.iters / (time.perf_counter() - started)
        rates.append(rate)
        out["models"][model_name] = {
            "input": f"{size}x{size}", "images_per_s": round(rate, 1), "gflops_per_image": round(flops / 1e9, 1),
            "fraction_of_bf16_peak": round(rate * flops / (peak * 1e12), 3) if peak else None}
    out["pass_model_bound_images_per_s"] = round(1 / sum(1 / r for r in rates), 1)
    out["peak_bf16_tflops"] = peak
    out["note"] = ("model-only throughput on random inputs; pass_model_bound: all three models one after the other "
                   "on one device; pass_bound: the slower of that and the decode threads' feed (per-core worker rate "
                   "x threads, as if they scaled perfectly)")
    # The workers' side on this machine's CPUs: the pass runs at the slower of the two.
    out["workers"], out["decode_threads"] = worker_bench(args), decode_threads()
    feed = out["workers"]["worker_images_per_s_per_core"] * out["decode_threads"]
    out["pass_bound_images_per_s"] = round(min(out["pass_model_bound_images_per_s"], feed), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", default="1536x1024", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", type=Path, nargs="+", help="other checkouts (old main first) to run the pass from")
    parser.add_argument("--runs", type=int, default=9, help="runs of each version with --compare")
    parser.add_argument("--workers", action="store_true", help="CPU worker cost per image at real sizes")
    parser.add_argument("--real-size", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    args = parser.parse_args()
    if args.workers or args.real_size:  # 12 MP photos for the workers: fewer of them
        args.size = "4000x3000" if args.size == parser.get_default("size") else args.size
        args.images = 8 if args.images == parser.get_default("images") else args.images
    bench = (compare_bench if args.compare else worker_bench if args.workers else real_size_bench if args.real_size
             else cpu_bench)
    print(json.dumps(bench(args), indent=2))


if __name__ == "__main__":
    main()
