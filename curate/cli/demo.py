"""`curate demo`: the whole path on built-in synthetic data, with the tiny model zoo.

Each step is a function taking the demo context; later features add their steps to
STEPS. The demo must stay under two minutes on 2 CPU cores.
"""
from __future__ import annotations

import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from PIL import Image

from curate.progress import print_summary, quiet_loaders, report
from curate.store import Dataset

N_IMAGES = 240


@dataclass
class Demo:
    root: Path
    engine: str = "local"
    timings: dict = field(default_factory=dict)

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def ds(self) -> Dataset:
        return Dataset(self.root / "dataset", create=True)


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Gradients, blobs and noise: cheap images that still differ in brightness, colour and blur."""
    # Separable waves and broadcast blobs keep this to a few ms per image on one core.
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    base = rng.uniform(0, 255, 3)
    arr = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.2, 6, 2)
        arr[..., c] = (base[c] + 90 * np.sin(x / width * fx * np.pi + rng.uniform(0, 6))
                       * np.cos(y / height * fy * np.pi))
    for _ in range(rng.integers(1, 6)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, max(width, height) / 3)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(0, 25)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_demo_images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> None:
    """Varied sizes, aspect ratios, formats and modes; exact duplicates; a few broken files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ratios = [1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 2.5, 0.4]
    for i in range(n):
        ratio = ratios[i % len(ratios)]
        short = int(rng.integers(160, 420))
        w, h = (int(short * ratio), short) if ratio >= 1 else (short, int(short / ratio))
        img = synthetic_image(rng, w, h)
        kind = i % 10
        sub = folder / f"batch{i % 4}"
        sub.mkdir(exist_ok=True)
        if kind == 7:
            img.convert("RGBA").save(sub / f"img{i:04d}.png")
        elif kind == 8:
            img.convert("L").save(sub / f"img{i:04d}.png")
        elif kind == 9:
            img.convert("P").save(sub / f"img{i:04d}.gif")
        else:
            img.save(sub / f"img{i:04d}.jpg", quality=int(rng.integers(70, 95)))
    # exact duplicates under other names, and a near duplicate (re-encoded)
    for i in range(0, 30, 10):
        shutil.copy(folder / f"batch{i % 4}" / f"img{i:04d}.jpg", folder / f"copy_of_{i:04d}.jpg")
    Image.open(folder / "batch0" / "img0000.jpg").save(folder / "near_dup_0000.jpg", quality=60)
    # broken files: every one must become a row with a reason
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_bytes(b"<html>not an image</html>")
    good = (folder / "batch1" / "img0001.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n"
                                     + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 90000, 90000, 8, 2, 0, 0, 0))
                                     + _png_chunk(b"IEND", b""))  # declares 8 gigapixels, holds none
    # odd but valid: every one must decode to sensible RGB
    odd = synthetic_image(rng, 300, 200)
    odd.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.asarray(odd.convert("L"), np.uint16) * 257)).save(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: ingest reports it upright, 200x300
    odd.save(folder / "rotated.jpg", exif=exif.tobytes())
    odd.save(folder / "animated.gif", save_all=True, append_images=[odd.rotate(90), odd.rotate(180)], duration=80)
    odd.convert("LA").save(folder / "grey_alpha.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def step_images(demo: Demo) -> None:
    write_demo_images(demo.images)


def step_ingest(demo: Demo) -> None:
    from curate.pipelines.ingest import ingest

    print_summary("ingest", ingest([str(demo.images)], demo.ds).report())


def step_hash(demo: Demo) -> None:
    from curate.pipelines.executor import run
    from curate.pipelines.stats import StatsStage

    print_summary("hash", run(demo.ds, StatsStage(), engine=demo.engine)[0].report())


def step_dups(demo: Demo) -> None:
    from curate.cli.output import write_result
    from curate.pipelines.dups import DEFAULT_THRESHOLD, duplicate_groups

    report.print(f"[dim]$ curate dups {demo.root / 'dataset'} --threshold {DEFAULT_THRESHOLD}[/dim]")
    groups = duplicate_groups(demo.ds, DEFAULT_THRESHOLD)
    write_result(groups.set_column(2, "image_id", pa.compute.utf8_slice_codeunits(groups.column("image_id"), 0, 12)),
                 "table", None)


def step_info(demo: Demo) -> None:
    from curate.cli.output import write_result
    from curate.pipelines.dups import dataset_info

    report.print(f"[dim]$ curate info {demo.root / 'dataset'}[/dim]")
    info, summary = dataset_info(demo.ds)
    write_result(info, "table", None)
    print_summary("dataset", summary)


# The tiny LLaVA captions about a quarter of the images (a hash prefix is a stable random
# subset), to show --where and keep the step to a few seconds on 2 cores.
CAPTION_WHERE = "image_id < '4'"


def step_caption(demo: Demo) -> None:
    from curate.models.tiny import write_zoo
    from curate.pipelines.caption import CaptionStage
    from curate.pipelines.executor import run

    llava = write_zoo(demo.root / "models", ["llava"])["llava"]
    stage = CaptionStage(f"llava:{llava}", "Describe the image.", max_new_tokens=12, batch_size=16, device="cpu")
    report.print(f"[dim]$ curate caption {demo.root / 'dataset'} --model llava:{llava} --prompt 'Describe the image.' "
                  f'--max-new-tokens 12 --where "{CAPTION_WHERE}"[/dim]')
    print_summary("caption (random weights: word salad)",
                  run(demo.ds, stage, engine=demo.engine, where=CAPTION_WHERE)[0].report())


SCORING_FAMILIES = ["open_clip", "quality_head", "wd14", "owlv2"]


def step_score(demo: Demo) -> None:
    """The scoring pass with the tiny zoo: CLIP + WD14 + OWLv2 from one decode, then quality ranks."""
    from curate.models.tiny import write_zoo
    from curate.pipelines.score import score

    zoo = write_zoo(demo.root / "models", SCORING_FAMILIES)
    report.print(f"[dim]$ curate score {demo.root / 'dataset'} --clip {zoo['open_clip']} "
                  f"--quality {zoo['quality_head']} --tagger wd14:{zoo['wd14']} --watermark owlv2:{zoo['owlv2']}[/dim]")
    for summary in score(demo.ds, clip=str(zoo["open_clip"]), quality=str(zoo["quality_head"]),
                         tagger=f"wd14:{zoo['wd14']}", watermark=f"owlv2:{zoo['owlv2']}", engine=demo.engine):
        print_summary(f"score: {summary.stage}", summary.report())


DEMO_BUCKETS = "rule:step=64,min_area=40000,max_area=65536"  # ~256x256: the demo's images are small


def step_encode(demo: Demo) -> None:
    """Buckets and latents with the tiny VAE, at a small bucket set so it stays fast on CPU."""
    from curate.buckets import parse_bucket_set
    from curate.cli.output import write_result
    from curate.models.tiny import write_zoo
    from curate.models.vae import Vae
    from curate.pipelines.buckets import assign_buckets
    from curate.pipelines.encode import EncodeStage
    from curate.pipelines.executor import run

    vae = write_zoo(demo.root / "models", ["vae"])["vae"]
    buckets = parse_bucket_set(DEMO_BUCKETS)
    report.print(f"[dim]$ curate encode {demo.root / 'dataset'} --vae {vae} --set {DEMO_BUCKETS}[/dim]")
    print_summary("buckets", assign_buckets(demo.ds, buckets, show_progress=False).report())
    stage = EncodeStage([Vae(str(vae))], buckets, device="cpu", batch_size=16)
    print_summary("encode", run(demo.ds, stage, engine=demo.engine)[0].report())
    write_result(demo.ds.sql("SELECT target_width || 'x' || target_height AS bucket, count(*) AS latents, "
                             "any_value(shape) AS shape FROM latents WHERE status = 'ok' "
                             "GROUP BY ALL ORDER BY latents DESC"),
                 "table", None)


QUERIES = [
    ("Errors by code", "SELECT error, count(*) AS files FROM images WHERE status = 'error' GROUP BY error "
     "ORDER BY files DESC"),
    ("Images by format and mode", "SELECT format, mode, count(*) AS images FROM manifest GROUP BY ALL "
     "ORDER BY images DESC"),
    ("Sources that are exact duplicates", "SELECT image_id[:12] AS image, sources FROM manifest "
     "WHERE len(sources) > 1"),
    ("A few captions", "SELECT source, caption FROM manifest WHERE caption IS NOT NULL ORDER BY source LIMIT 3"),
    ("Blurriest images", "SELECT source, round(sharpness::DOUBLE, 1) AS sharpness FROM manifest "
     "ORDER BY sharpness LIMIT 3"),
    ("Images per quality rank (random tiny head)", "SELECT rank, count(*) AS images, count_if(has_watermark) "
     "AS watermarked FROM manifest GROUP BY rank ORDER BY rank"),
    ("Most frequent tags (random tiny tagger)", "SELECT tag, count(*) AS images "
     "FROM (SELECT unnest(tags) AS tag FROM manifest) GROUP BY tag ORDER BY images DESC, tag LIMIT 5"),
]


def step_queries(demo: Demo) -> None:
    from curate.cli.output import write_result

    for title, sql in QUERIES:
        report.print(f"\n[bold]{title}[/bold]\n[dim]$ curate sql {demo.root / 'dataset'} \"{sql}\"[/dim]")
        write_result(demo.ds.sql(sql), "table", None)


def step_quality(demo: Demo) -> None:
    """The quality head loop (`curate quality`) with simulated ratings, on the tiny CLIP."""
    from curate.models.tiny import write_zoo
    from curate.pipelines.quality.simulate import demo_quality_loop

    clip = write_zoo(demo.root / "models", ["open_clip"])["open_clip"]
    print_summary("quality: simulated ratings -> import -> fit -> score --quality",
                  demo_quality_loop(demo.ds, clip, demo.root / "dataset" / "heads" / "quality",
                                    demo.root / "ratings.csv"))
    report.print("[dim]$ curate sql DS \"SELECT rank, count(*) AS images, round(avg(brightness), 2) AS brightness "
                 "FROM manifest GROUP BY rank ORDER BY rank\"[/dim]")
    from curate.cli.output import write_result

    write_result(demo.ds.sql("SELECT rank, count(*) AS images, round(avg(brightness), 2) AS brightness FROM manifest "
                             "GROUP BY rank ORDER BY rank"), "table", None)



DEMO_TRAIN = {"max_steps": 3, "batch_size": 4, "precision": "fp32", "learning_rate": 1e-4, "validate_every": 3,
              "checkpoint_every": 3, "stable_train_samples": 16, "validation_max": 16}


def step_train(demo: Demo) -> None:
    """A few training steps of the tiny SDXL on the demo's latents; the checkpoint then draws an image."""
    from diffusers import StableDiffusionXLPipeline

    from curate.models.tiny import write_zoo
    from curate.trainer.config import load_config
    from curate.trainer.dry_run import dry_run
    from curate.trainer.train import run_training

    base = write_zoo(demo.root / "models", ["sdxl"])["sdxl"]
    config = load_config(None, output=str(demo.root / "run"), **DEMO_TRAIN)
    settings = " ".join(f"{k}={v}" for k, v in DEMO_TRAIN.items())
    report.print(f"[dim]$ curate train {demo.root / 'dataset'} --base {base} --output {config.output} --dry-run[/dim]")
    dry_run(demo.ds, str(base), config)
    report.print(f"[dim]$ curate train {demo.root / 'dataset'} --base {base} "
                 f"--output {config.output}  # {settings}[/dim]")
    summary = run_training(str(demo.root / "dataset"), str(base), config, show_progress=False)
    print_summary("train", summary)
    quiet_loaders()  # diffusers is imported now: its own bars off
    pipe = StableDiffusionXLPipeline.from_pretrained(summary["checkpoint"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("score_7, smile", num_inference_steps=2, height=64, width=64).images[0]
    image.save(demo.root / "run" / "sample.png")
    report.print(f"the checkpoint loads into StableDiffusionXLPipeline: {demo.root / 'run' / 'sample.png'} "
                 "(random weights: noise)")


STEPS = [step_images, step_ingest, step_hash, step_dups, step_score, step_caption, step_quality, step_encode, step_info,
         step_train, step_queries]


def run_demo(root: Path, engine: str = "local") -> Demo:
    if root.exists():
        shutil.rmtree(root)
    demo = Demo(root, engine)
    for step in STEPS:
        name = step.__name__.removeprefix("step_")
        report.rule(f"[bold]{name}")
        started = time.perf_counter()
        step(demo)
        demo.timings[name] = round(time.perf_counter() - started, 1)
    print_summary("demo: seconds per step", demo.timings | {"total": round(sum(demo.timings.values()), 1)})
    dataset = root / "dataset"
    report.print("\n[bold]next[/bold]: look at the dataset in your browser (edits there reach training), and write "
                 "a one-page report of it:", soft_wrap=True)
    report.print(f"  curate view {dataset}", highlight=False, soft_wrap=True)
    report.print(f"  curate report {dataset} -o {root / 'report.html'} --base {root / 'models' / 'sdxl'}",
                 highlight=False, soft_wrap=True)
    return demo
