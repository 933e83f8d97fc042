"""The `curate` command line. Each command is a thin layer over a function in curate.pipelines
or curate.trainer; the options that set a model come from its family's declaration."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from curate.buckets import SET_HELP
from curate.cli.common import (
    BatchSizeOpt,
    DatasetArg,
    DeviceOpt,
    DtypeOpt,
    Engine,
    EngineOpt,
    FormatOpt,
    HostOpt,
    OutputOpt,
    PortOpt,
    QuietOpt,
    RayAddressOpt,
    WhereOpt,
    fail,
    open_dataset,
    serve_page,
)
from curate.cli.quality import quality_app
from curate.devices import DeviceError
from curate.models.families import FAMILIES, family, of_task
from curate.pipelines.dups import DEFAULT_THRESHOLD, MAX_THRESHOLD
from curate.progress import console, print_summary, quiet_loaders
from curate.store import Dataset, DatasetError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Turn a folder of images into a training-ready dataset, and train on it.")
app.add_typer(quality_app, name="quality")


@app.callback()
def storage_options(
    endpoint_url: Annotated[Optional[str], typer.Option(
        "--endpoint-url", envvar="AWS_ENDPOINT_URL", help="An S3-compatible endpoint for s3:// datasets and sources "
        "(MinIO, R2, ...); keys and region come from the usual AWS environment variables.")] = None,
):
    """Options for every command."""
    if endpoint_url:  # through the environment: pyarrow, DuckDB's reads and Ray workers all see it
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


def main() -> None:
    quiet_loaders()
    try:
        app()
    except DatasetError as e:  # said by the store wherever it happened: a full disk, a read-only dataset
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise SystemExit(2) from None


def model_errors() -> tuple[type[Exception], ...]:
    """The errors a command says in one line (a model, a device, a dataset the user can fix)."""
    from curate.models.common import ModelError
    from curate.models.vae import VaeError

    return ModelError, VaeError, DeviceError, DatasetError


def report(title: str, summaries) -> None:
    for summary in summaries if isinstance(summaries, list) else [summaries]:
        print_summary(title if not isinstance(summaries, list) else f"{title}: {summary.stage}", summary.report())


def weights_help(task: str) -> str:
    """FAMILY[:MODEL] choices of a task, with each family's default weights."""
    return "; ".join(f"{f.name}[:MODEL] (default {f.weights})" for f in of_task(task))


def default_of(name: str, setting: str):
    return family(name).default(setting)


class SidecarText(str, Enum):
    auto = "auto"
    caption = "caption"
    tags = "tags"


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Folders, image files, tar archives (local or s3://), "
                                                      "Hugging Face datasets (a save_to_disk folder, a parquet file, "
                                                      "hf:HUB_ID), then the dataset directory last.")],
    sidecar_text: Annotated[SidecarText, typer.Option("--sidecar-text", help="How .txt/.caption files beside the "
                                                      "images read: auto (a comma list of short tags is tags, "
                                                      "'CAPTION ||| tags' both, else a caption), caption or tags."
                                                      )] = SidecarText.auto,
    caption_column: Annotated[Optional[str], typer.Option("--caption-column", help="Hugging Face sources: the "
                                                          "caption column (default: caption or text).")] = None,
    tags_column: Annotated[Optional[str], typer.Option("--tags-column", help="Hugging Face sources: the tags column, "
                                                       "a list or a comma-separated string (default: tags).")] = None,
    reference: Annotated[bool, typer.Option("--reference/--copy", help="Keep images where they are and store where "
                                            "they are (stages read them there), or copy their bytes into the "
                                            "dataset (the default: it stands on its own).")] = False,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False,
):
    """Add images to a dataset: every image file gets one row, ok or with an error code; the captions
    and tags that come with them (side files, shard members, dataset columns) are imported."""
    from curate.pipelines.hf_source import SourceError
    from curate.pipelines.ingest import check_sources
    from curate.pipelines.ingest import ingest as run_ingest

    if len(sources) < 2:
        fail("give at least one source and the dataset directory: curate ingest SRC... DS")
    *srcs, ds_path = sources
    try:
        check_sources(srcs, caption_column, tags_column)
        summary = run_ingest(srcs, Dataset(ds_path, create=True), show_progress=not quiet,
                             engine=engine.value, ray_address=ray_address, sidecar_text=sidecar_text.value,
                             caption_column=caption_column, tags_column=tags_column, reference=reference)
    except (FileNotFoundError, DatasetError, SourceError) as e:
        fail(str(e))
    report(f"ingest -> {ds_path}", summary)


@app.command()
def sql(
    dataset: DatasetArg,
    query: Annotated[str, typer.Argument(help="A SQL query over the tables and the `manifest` view.")],
    format: FormatOpt = "table",
    output: OutputOpt = None,
):
    """Run a read-only SQL query over the dataset (DuckDB)."""
    ds = open_dataset(dataset)
    try:
        result = ds.sql(query, rows=format in ("table", "json"))  # Python values: no pyarrow to import
    except DatasetError as e:
        fail(str(e))
    write_or_fail(result, format, output)


def write_or_fail(result, format: str, output: str | None) -> None:
    from curate.cli.output import write_result

    try:
        write_result(result, format, output)
    except ValueError as e:
        fail(str(e))


@app.command()
def dups(
    dataset: DatasetArg,
    threshold: Annotated[int, typer.Option("--threshold", help="Near duplicates: at most this many of the 64 phash "
                                                               "bits differ "
                                                               f"(0-{MAX_THRESHOLD}).")] = DEFAULT_THRESHOLD,
    format: FormatOpt = "table",
    output: OutputOpt = None,
):
    """Exact duplicate groups (same bytes, several sources) and near duplicates (phash distance)."""
    from curate.pipelines.dups import duplicate_groups, has_stats

    ds = open_dataset(dataset)
    try:
        groups = duplicate_groups(ds, threshold)
    except ValueError as e:
        fail(str(e))
    if not has_stats(ds):
        console.print(f"[yellow]note:[/yellow] no perceptual hashes yet, so exact duplicates only; "
                      f"run `curate hash {dataset}`")
    write_or_fail(groups, format, output)
    kinds = groups.column("kind").to_pylist()
    exact = len(set(g for g, k in zip(groups.column("group").to_pylist(), kinds) if k == "exact"))
    print_summary("dups", {"exact groups": exact, "near groups": len(set(groups.column("group").to_pylist())) - exact,
                           "threshold (bits)": threshold}, aside=format != "table" and output is None)


@app.command()
def info(dataset: DatasetArg, format: FormatOpt = "table", output: OutputOpt = None):
    """Every table: rows, ok rows, errors by code, the models present, parts and size."""
    from curate.pipelines.dups import dataset_info

    ds = open_dataset(dataset)
    tables, summary = dataset_info(ds)
    write_or_fail(tables, format, output)
    aside = format != "table" and output is None
    print_summary(f"dataset {ds.root}", summary, aside=aside)
    unread = ds.unread_parts()
    if unread:
        print_summary("parts not read (damaged, or not their table's schema)",
                      {str(path).removeprefix(f"{ds.root}/"): why for _, path, why in unread}, aside=aside)


@app.command("hash")
def hash_(dataset: DatasetArg, where: WhereOpt = None, engine: EngineOpt = Engine.local,
          ray_address: RayAddressOpt = None, quiet: QuietOpt = False):
    """Per-image statistics: perceptual hash, brightness, sharpness, colourfulness, entropy."""
    from curate.pipelines.executor import run
    from curate.pipelines.stats import StatsStage

    ds = open_dataset(dataset)
    try:
        summaries = run(ds, StatsStage(), engine=engine.value, where=where, ray_address=ray_address,
                        show_progress=not quiet)
    except DatasetError as e:
        fail(str(e))
    report("hash", summaries[0])


BucketSetOpt = Annotated[str, typer.Option("--set", help=f"Bucket set: {SET_HELP}.")]
UpscaleOpt = Annotated[bool, typer.Option("--allow-upscale", help="Let images smaller than a bucket "
                                                                  "be scaled up into it.")]


class CropMode(str, Enum):
    random = "random"
    center = "center"


def bucket_set_or_fail(spec: str):
    from curate.buckets import BucketSetError, parse_bucket_set

    try:
        return parse_bucket_set(spec)
    except BucketSetError as e:
        fail(str(e))


@app.command()
def buckets(dataset: DatasetArg, set_: BucketSetOpt = "sdxl", where: WhereOpt = None,
            allow_upscale: UpscaleOpt = False, engine: EngineOpt = Engine.local, ray_address: RayAddressOpt = None,
            quiet: QuietOpt = False):
    """Give every image the bucket of nearest aspect ratio it covers (error too_small if none)."""
    from curate.pipelines.buckets import assign_buckets

    ds, bucket_set = open_dataset(dataset), bucket_set_or_fail(set_)
    try:
        summary = assign_buckets(ds, bucket_set, where, allow_upscale, show_progress=not quiet, engine=engine.value,
                                 ray_address=ray_address)
    except DatasetError as e:
        fail(str(e))
    report("buckets", summary)


@app.command()
def encode(
    dataset: DatasetArg,
    vae: Annotated[Optional[str], typer.Option("--vae", help="VAE hub id or directory (a VAE, or a pipeline "
                                                             "with vae/), optionally @fp32, @fp16 or @bf16; e.g. "
                                                             f"{family('vae').weights}.")] = None,
    mixed_vae: Annotated[Optional[str], typer.Option("--mixed-vae", help="Comma-separated VAEs (same syntax as --vae); "
                                                                         "each image gets one, "
                                                                         "chosen by seed.")] = None,
    set_: BucketSetOpt = "sdxl",
    where: WhereOpt = None,
    crop: Annotated[CropMode, typer.Option("--crop", help="random (seeded per image) or center.")] = CropMode.random,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the crops, the latent samples and the mixed-VAE "
                                                     "choice.")] = 0,
    keep_distribution: Annotated[bool, typer.Option("--keep-distribution", help="Also store the latent mean and "
                                                    "log-variance so the trainer can resample.")] = False,
    allow_upscale: UpscaleOpt = False,
    flip: Annotated[bool, typer.Option("--flip", help="Also store the mirrored crop's latent, with its own crop "
                                                      "conditioning, for the trainer's flip_p.")] = False,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quiet: QuietOpt = False,
):
    """VAE latents cropped to each image's aspect bucket, with SDXL's size and crop conditioning."""
    from curate.models.vae import Vae
    from curate.pipelines.buckets import assign_buckets
    from curate.pipelines.encode import EncodeStage
    from curate.pipelines.executor import run

    if bool(vae) == bool(mixed_vae):
        fail("give exactly one of --vae M or --mixed-vae M1,M2,...")
    ds, bucket_set = open_dataset(dataset), bucket_set_or_fail(set_)
    try:
        vaes = [Vae.parse(v, dtype) for v in (mixed_vae.split(",") if mixed_vae else [vae])]
        assign_buckets(ds, bucket_set, where, allow_upscale, show_progress=not quiet)
        stage = EncodeStage(vaes, bucket_set, crop.value, seed, keep_distribution, allow_upscale, device, batch_size,
                            flip)
        summaries = run(ds, stage, engine=engine.value, where=where, ray_address=ray_address, show_progress=not quiet)
    except model_errors() as e:
        fail(str(e))
    report("encode", summaries[0])


@app.command()
def score(
    dataset: DatasetArg,
    clip: Annotated[Optional[str], typer.Option("--clip", help="The embedder: an open_clip model (a directory, a hub "
                                                               f"id such as {family('open_clip').weights}, or an "
                                                               "open_clip name as ViT-B-32:openai), or hf_clip[:MODEL] "
                                                               f"(default {family('hf_clip').weights}): transformers' "
                                                               "CLIP class token, what bigASP's scorer reads.")] = None,
    quality: Annotated[Optional[str], typer.Option("--quality", help="Quality head directory (from `curate quality "
                                                                     "fit`), or bigASP's scorer.pt (on hf_clip "
                                                                     "embeddings): ranks 0-9 from the stored "
                                                                     "embeddings.")] = None,
    tagger: Annotated[Optional[str], typer.Option("--tagger", help=f"{weights_help('tag')}; MODEL a directory or a "
                                                                   "hub id.")] = None,
    watermark: Annotated[Optional[str], typer.Option("--watermark", help=f"{weights_help('watermark')}: the watermark "
                                                                         "detector.")] = None,
    classifier: Annotated[Optional[list[str]], typer.Option(
        "--classifier", help="hf:MODEL, a transformers image-classification checkpoint (an NSFW detector such as "
        "Falconsai/nsfw_image_detection, a style or aesthetic classifier): every label's probability, in the "
        "classifications table and the manifest's `classes` map. Repeat it for several.")] = None,
    general_threshold: Annotated[Optional[float], typer.Option(
        "--general-threshold", min=0, max=1, help=f"Keep general tags over this probability (default: WD14 "
        f"{default_of('wd14', 'general')}, JoyTag {default_of('joytag', 'threshold')}).")] = None,
    character_threshold: Annotated[Optional[float], typer.Option(
        "--character-threshold", min=0, max=1, help="WD14: keep character tags over this probability (default "
        f"{default_of('wd14', 'character')}).")] = None,
    watermark_threshold: Annotated[Optional[float], typer.Option(
        "--watermark-threshold", min=0, max=1, help="Boxes (and has_watermark) over this score (default "
        f"{default_of('owlv2', 'threshold')}).")] = None,
    watermark_query: Annotated[Optional[str], typer.Option(
        "--watermark-query", help=f"What OWLv2 looks for (default {default_of('owlv2', 'query')!r}).")] = None,
    where: WhereOpt = None, engine: EngineOpt = Engine.local, ray_address: RayAddressOpt = None,
    batch_size: BatchSizeOpt = None, device: DeviceOpt = None, quiet: QuietOpt = False,
):
    """The scoring pass: CLIP embeddings, quality ranks, tags, watermarks and classes, one decode per image."""
    from curate.pipelines.score import score as run_score

    ds = open_dataset(dataset)
    try:
        summaries = run_score(ds, clip=clip, quality=quality, tagger=tagger, watermark=watermark,
                              classifiers=classifier or (), where=where,
                              engine=engine.value, ray_address=ray_address, device=device,
                              batch_size=batch_size, show_progress=not quiet,
                              general_threshold=general_threshold, character_threshold=character_threshold,
                              watermark_threshold=watermark_threshold, watermark_query=watermark_query)
    except model_errors() as e:
        fail(str(e))
    report("score", summaries)


CAPTION_SCHEMES = ", ".join(f"{f.name}:{f.weights or 'MODEL'}" for f in of_task("caption"))


@app.command()
def caption(
    dataset: DatasetArg,
    model: Annotated[str, typer.Option("--model", "-m", help=f"SCHEME:TARGET, one of {CAPTION_SCHEMES} (openai: "
                                                             "BASE_URL#MODEL); or a model directory alone.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The instruction sent with each image (default: "
                                                                   "the model family's own).")] = None,
    prompt_file: Annotated[Optional[str], typer.Option("--prompt-file", help="Read the prompt from this file "
                                                                             "instead.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Generation limit per caption.")]
    = default_of("llava", "max_new_tokens"),
    max_chars: Annotated[Optional[int], typer.Option("--max-chars", min=1, help="Cut longer captions at a sentence "
                                                                                "end.")] = None,
    where: WhereOpt = None,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="openai: requests in flight (a batch is "
                                             "sent as one wave; the batch size grows to match).")]
    = default_of("openai", "concurrency"),
    request_timeout: Annotated[float, typer.Option("--request-timeout", min=0.01, help="openai: seconds to wait for "
                                                                                       "a reply.")]
    = default_of("openai", "timeout"),
    retries: Annotated[int, typer.Option("--retries", min=0, help="openai: retries on 5xx/429 replies, timeouts and "
                                                                  "dropped connections.")]
    = default_of("openai", "retries"),
    quiet: QuietOpt = False,
):
    """Caption images with a VLM: one caption per image per model and prompt; resumable."""
    from curate.pipelines.caption import CaptionStage
    from curate.pipelines.executor import run

    if prompt is not None and prompt_file is not None:
        fail("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read --prompt-file {prompt_file}: {e}")
    ds = open_dataset(dataset)
    http = {"concurrency": concurrency, "timeout": request_timeout, "retries": retries} if model.startswith("openai:") \
        else {}
    try:
        stage = CaptionStage(model, prompt, max_new_tokens, batch_size=batch_size, device=device, dtype=dtype,
                             max_chars=max_chars, **http)
        summaries = run(ds, stage, engine=engine.value, where=where, ray_address=ray_address, show_progress=not quiet)
    except model_errors() as e:
        fail(str(e))
    report("caption", summaries[0])


ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="train.toml: its [prompts] settings and seed "
                                                                   "build the example prompts.")]


@app.command()
def view(dataset: DatasetArg, where: WhereOpt = None, host: HostOpt = "127.0.0.1", port: PortOpt = 8766,
         config: ConfigOpt = None):
    """Look at the dataset in a local web page: a grid over any filter, everything known about an image, and
    edits (exclude, tags, captions) that the manifest, every --where and the trainer honour."""
    from curate.cli.view import serve
    from curate.cli.view_data import ViewData
    from curate.trainer.config import load_config

    ds = open_dataset(dataset)
    try:
        settings = load_config(config)
        data = ViewData(ds, settings.prompts, settings.seed)
        images = data.count(where)
        server = serve(data, where, host, port)
    except (ValueError, DatasetError, OSError) as e:
        fail(str(e))
    console.print(f"{images} images{' match --where' if where else ''}")
    serve_page(server, "view", host)
    print_summary("view", {"edits and undos this session": data.made})


@app.command("report")
def report_(
    dataset: DatasetArg,
    output: Annotated[str, typer.Option("--output", "-o", help="The HTML file to write.")] = "report.html",
    where: WhereOpt = None,
    base: Annotated[Optional[str], typer.Option("--base", help="The model you will train (as for curate train): "
                                                               "adds the trainer's dry run.")] = None,
    config: ConfigOpt = None,
):
    """One self-contained HTML page about the dataset (opens offline): counts, errors, ranks, tags, captions, sizes,
    buckets, watermarks, duplicates, the quality fit and what training will see."""
    from curate.cli.report import write_report
    from curate.trainer.config import load_config

    ds = open_dataset(dataset)
    try:
        summary = write_report(ds, Path(output), load_config(config, where=where), base)
    except (ValueError, DatasetError, OSError) as e:
        fail(str(e))
    print_summary(f"report -> {output}", summary)


@app.command()
def export(
    dataset: DatasetArg,
    dest: Annotated[str, typer.Argument(help="The export directory: new, empty, or an earlier export of the same "
                                             "format (then only what is new is added).")],
    format: Annotated[str, typer.Option("--format", help="kohya (images, .txt captions, sd-scripts dataset.toml), "
                                                         "imagefolder (metadata.jsonl), webdataset (tar shards) "
                                                         "or parquet (rows with image bytes).")] = "kohya",
    where: WhereOpt = None,
    prompt: Annotated[str, typer.Option("--prompt", help="The text: tags, caption or both (kohya: 'CAPTION ||| "
                                                         "tags', the caption kept and the tags shuffled).")] = "both",
    link: Annotated[str, typer.Option("--link", help="copy the bytes, or hard/sym-link the source files that still "
                                                     "hold them (kohya, imagefolder).")] = "copy",
    shard_size: Annotated[float, typer.Option("--shard-size", help="webdataset and parquet: MB of images per "
                                                                   "file.")] = 1000,
    quiet: QuietOpt = False,
):
    """Export images with their captions and tags for other trainers and libraries."""
    from curate.pipelines.export import ExportError
    from curate.pipelines.export import export as run_export

    ds = open_dataset(dataset)
    try:
        summary = run_export(ds, dest, format, where=where, prompt=prompt, link=link, shard_mb=shard_size,
                             show_progress=not quiet)
    except (ExportError, DatasetError, OSError) as e:
        fail(str(e))
    unavailable = summary.pop("unavailable")
    print_summary(f"export -> {dest}", summary | ({"unavailable": len(unavailable)} if unavailable else {}))
    if unavailable:
        listed = ", ".join(f"{i[:12]} ({source})" for i, source in unavailable[:5])
        fail(f"{len(unavailable)} image(s) not exported: their bytes are no longer available (not in the dataset, "
             f"and no source file holds them any more): {listed}{', ...' if len(unavailable) > 5 else ''}")


@app.command()
def demo(
    directory: Annotated[str, typer.Argument(help="Where to write the demo images and dataset (replaced).")]
    = "demo-dataset",
    engine: EngineOpt = Engine.local,
):
    """Run the whole path on built-in synthetic images with the tiny model zoo."""
    from curate.cli.demo import run_demo

    run_demo(Path(directory), engine.value)


models_app = typer.Typer(no_args_is_help=True, help="Model helpers: the families and their defaults, the tiny zoo.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list():
    """Every model family: its task, default weights and settings (README's table)."""
    print_summary("model families", {f.name: f"{f.task}: {f.weights or '(give one)'}; " + (", ".join(
        f"{s.name}={s.default!r}" for s in f.settings) or "no settings") for f in FAMILIES.values()})


@models_app.command("tiny")
def models_tiny(
    directory: Annotated[str, typer.Argument(help="Where to write the zoo (one folder per family).")],
    families: Annotated[Optional[list[str]], typer.Option("--family", help="Only these families (repeatable).")] = None,
):
    """Write random-weight models in the exact on-disk layout of the real ones (for tests and the demo)."""
    from curate.models.tiny import write_zoo

    try:
        written = write_zoo(directory, families)
    except ValueError as e:
        fail(str(e))
    print_summary("tiny zoo", {name: str(path) for name, path in written.items()})


prompts_app = typer.Typer(no_args_is_help=True, help="Training prompt helpers.")
app.add_typer(prompts_app, name="prompts")


@prompts_app.command("fit")
def prompts_fit(corpus: Annotated[str, typer.Argument(help="A text file of real user prompts, one per line.")]):
    """Fit the tag-count distribution (mean, sd) from a corpus of prompts; prints the [prompts] TOML lines."""
    from curate.trainer.prompts import fit_tag_count

    path = Path(corpus)
    if not path.is_file():
        fail(f"no such file: {corpus}")
    try:
        fitted = fit_tag_count(path.read_text(encoding="utf-8", errors="replace").splitlines())
    except ValueError as e:
        fail(str(e))
    print_summary(f"tag counts in {corpus}", fitted)
    print(f"[prompts]\ntag_count_mean = {fitted['tag_count_mean']}\ntag_count_sd = {fitted['tag_count_sd']}")


@app.command()
def train(
    dataset: DatasetArg,
    base: Annotated[str, typer.Option("--base", help="The base model: a diffusers pipeline directory "
                                                     "(SDXL or SD1.5).")],
    config: Annotated[Optional[str], typer.Option("--config", help="train.toml with any setting (docs/train.toml lists "
                                                                   "them all).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Run directory: checkpoints/, tensorboard/, "
                                                                   "log.jsonl.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps to train for.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Data-parallel workers on Ray Train (1: in this "
                                                                     "process).")] = None,
    where: WhereOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --output.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report batches, padded prompt lengths, tag counts "
                                                            "and example prompts.")] = False,
    ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False,
):
    """Train the UNet (and text encoder 1) of an SDXL or SD1.5 model on the dataset's latents."""
    from curate.trainer.config import load_config

    ds = open_dataset(dataset)
    try:
        settings = load_config(config, output=output, max_steps=max_steps, workers=workers, where=where)
        if dry_run:
            from curate.trainer.dry_run import dry_run as run_dry

            run_dry(ds, base, settings, show_progress=not quiet)
            return
        if settings.workers > 1:
            from curate.trainer.distributed import train_on_ray

            summary = train_on_ray(str(ds.root), base, settings, resume, ray_address, show_progress=not quiet)
        else:
            from curate.trainer.train import run_training

            summary = run_training(str(ds.root), base, settings, resume, show_progress=not quiet)
    except (ValueError, DatasetError) as e:
        fail(str(e))
    print_summary(f"train -> {settings.output}", summary)


class SampleWeights(str, Enum):
    trained = "trained"
    ema = "ema"
    both = "both"


@app.command()
def sample(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint folder (runs/a/checkpoints/step-N): a pipeline, or a "
                                                   "LoRA run's.")],
    prompts: Annotated[str, typer.Option("--prompts", help="One prompt a line, with kohya's options: --n NEGATIVE "
                                                           "--w WIDTH --h HEIGHT --d SEED --s STEPS --l GUIDANCE.")],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Folder for the grid (default: the run's "
                                                                        "samples/).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="A LoRA checkpoint's base model (default: the one it "
                                                               "was trained on).")] = None,
    weights: Annotated[Optional[SampleWeights], typer.Option("--weights", help="trained, ema, or both side by side "
                                                                              "(default: both when the checkpoint "
                                                                              "has EMA weights).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Denoising steps (default: the run's "
                                                                        "sample_steps; a line's --s wins).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Guidance scale (default: the run's "
                                                                         "sample_guidance; --l wins).")] = None,
    device: DeviceOpt = None,
):
    """Render a prompts file with a saved checkpoint, as the trainer's sample grids are made."""
    from curate.trainer.sampling import sample_checkpoint

    if not Path(prompts).is_file():
        fail(f"no such prompts file: {prompts}")
    try:
        path = sample_checkpoint(checkpoint, prompts, output, base, weights.value if weights else None, device,
                                 steps, guidance)
    except (ValueError, OSError) as e:
        fail(str(e))
    print(path)
