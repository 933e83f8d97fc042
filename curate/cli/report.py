"""`curate report`: one self-contained HTML page about a dataset, that opens offline.

Every plot is inline SVG and every picture an embedded thumbnail; a Content-Security-Policy
forbids the page from loading anything, so it makes no network request. Sections cover the
images chosen by --where (the per-table counts cover the whole dataset: ingest errors have
no manifest row to filter on).
"""
from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path

import duckdb

from curate.cli import report_plots as rp
from curate.cli.view_data import manifest_views
from curate.pipelines.dups import dataset_info, duplicate_groups, has_stats
from curate.store import Dataset
from curate.trainer.config import TrainConfig
from curate.trainer.data import TrainData, dry_run_report
from curate.trainer.model import pipeline_tokenizer
from curate.trainer.rows import load_rows, split_rows

SAMPLES = 8  # thumbnails per rank, watermark and duplicate row
STYLE = """body{font:14px system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
th{color:#666;font-weight:normal}figure{margin:12px 0;display:inline-block;vertical-align:top}
figcaption{font-size:12px;color:#666;max-width:640px}figure svg{max-width:100%;height:auto}
.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0;align-items:flex-end}
.thumb{font-size:11px;color:#666;display:flex;flex-direction:column;align-items:center}
.row-title{width:70px;font-weight:bold;align-self:center}
.pic{position:relative;display:inline-block}.pic img{display:block;max-width:120px;max-height:120px}
.pic svg{position:absolute;inset:0;width:100%;height:100%}.note{color:#666}"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def write_report(ds: Dataset, output: Path, config: TrainConfig, base: str | None = None) -> dict:
    """Write the report of the images chosen by config.where (the report's --where); its summary."""
    where = config.where
    started = time.perf_counter()
    con = ds.connect()
    manifest_views(con, ds.stage_manifest(con))  # the join, cached as for curate view
    try:
        try:
            chosen = con.table("manifest")
            if where and where.strip():
                chosen = chosen.filter(duckdb.SQLExpression(where))
            chosen.create("chosen")
        except duckdb.Error as e:
            raise ValueError(f"bad --where {where!r}: {str(e).splitlines()[0]}") from None
        sections = [("Tables", tables(ds)), ("Quality ranks", ranks(ds, con)), ("Tags", tags(con)),
                    ("Captions", captions(con)), ("Sizes, aspect ratios and buckets", sizes(con)),
                    ("Watermarks", watermarks(ds, con)), ("Duplicates", duplicates(ds, con)),
                    ("The quality fit", quality_fit(ds, con)), ("What training will see", training(ds, base, config))]
        images = con.sql("SELECT count(*) FROM chosen").fetchall()[0][0]
    finally:
        con.close()
    title = f"curate report: {ds.name}"
    body = "".join(f'<section id="s{i}"><h2>{html.escape(name)}</h2>{content}</section>'
                   for i, (name, content) in enumerate(sections))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>'
            f"<h1>{html.escape(title)}</h1><p class=note>{html.escape(str(ds.root))}: {images} images"
            f"{' where ' + html.escape(where) if where else ''}</p>{body}</body></html>")
    output.write_text(page, encoding="utf-8")
    return {"report": str(output), "images": images, "plots": page.count('class="plot"'),
            "size (KiB)": round(len(page.encode()) / 1024), "seconds": round(time.perf_counter() - started, 2)}


def table_html(rows: list[dict]) -> str:
    if not rows:
        return "<p class=note>nothing yet</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def rows(con, sql: str) -> list[dict]:
    return con.sql(sql).to_arrow_table().to_pylist()


def tables(ds: Dataset) -> str:
    info, summary = dataset_info(ds)
    return table_html([summary]) + "<h3>rows, ok rows and error codes per table and model</h3>" + \
        table_html(info.to_pylist())


def ranks(ds: Dataset, con) -> str:
    counts = rows(con, "SELECT rank, count(*) AS n FROM chosen GROUP BY rank ORDER BY rank NULLS LAST")
    ranked = [r for r in counts if r["rank"] is not None]
    if not ranked:
        return "<p class=note>no ranks yet: run <code>curate score DS --quality HEAD</code></p>"
    unranked = sum(r["n"] for r in counts if r["rank"] is None)
    out = rp.bars("ranks", [r["rank"] for r in ranked], [r["n"] for r in ranked], "images per quality rank",
                  "rank (0 = junk, left out of training by default)",
                  f"{unranked} images have no rank." if unranked else "Every image has a rank.", color=rp.GREEN)
    samples = rows(con, "SELECT image_id, rank FROM chosen WHERE rank IS NOT NULL QUALIFY row_number() OVER "
                        f"(PARTITION BY rank ORDER BY hash(image_id)) <= {SAMPLES} ORDER BY rank DESC, hash(image_id)")
    out += "<h3>sample images per rank</h3>"
    for rank in sorted({s["rank"] for s in samples}, reverse=True):
        out += rp.thumbnails(ds, [s for s in samples if s["rank"] == rank], title=f"rank {rank}")
    return out


def tags(con) -> str:
    top = rows(con, "SELECT tag, count(*) AS n FROM (SELECT unnest(tags) AS tag FROM chosen) "
                    "GROUP BY tag ORDER BY n DESC, tag LIMIT 50")
    if not top:
        return "<p class=note>no tags yet: run <code>curate score DS --tagger wd14</code></p>"
    out = rp.bars("tags", [t["tag"] for t in top], [t["n"] for t in top], "top 50 tags in the manifest", "",
                  "What prompts are built from: the latest tagger's tags, the detector's watermark, hand edits.",
                  horizontal=True)
    per_model = rows(con, "WITH x AS (SELECT t.model, unnest(t.tags) AS tag FROM tags t JOIN chosen USING (image_id) "
                          "WHERE t.status = 'ok'), c AS (SELECT model, tag, count(*) AS n FROM x GROUP BY model, tag) "
                          "SELECT model, tag, n FROM c QUALIFY row_number() OVER (PARTITION BY model "
                          "ORDER BY n DESC, tag) <= 50 ORDER BY model, n DESC, tag")
    for i, model in enumerate(dict.fromkeys(r["model"] for r in per_model)):
        mine = [r for r in per_model if r["model"] == model]
        out += rp.bars(f"tags-{i}", [r["tag"] for r in mine], [r["n"] for r in mine], f"top 50 tags by {model}", "",
                       "Each tagger's own tags, before hand edits.", horizontal=True)
    ratings = rows(con, "SELECT coalesce(rating, '(none)') AS rating, count(*) AS n FROM chosen GROUP BY ALL "
                        "ORDER BY n DESC")
    return out + rp.bars("ratings", [r["rating"] for r in ratings], [r["n"] for r in ratings], "rating tags", "rating",
                         "The tagger's most probable rating per image (WD14; JoyTag has none).")


def captions(con) -> str:
    lengths = rows(con, "SELECT c.model, len(string_split(trim(c.caption), ' ')) AS words FROM captions c "
                        "JOIN chosen USING (image_id) WHERE c.status = 'ok' AND c.caption IS NOT NULL")
    if not lengths:
        return "<p class=note>no captions yet: run <code>curate caption DS --model ...</code></p>"
    series = {m: [r["words"] for r in lengths if r["model"] == m] for m in dict.fromkeys(r["model"] for r in lengths)}
    return rp.histogram("captions", series, "caption length", "words per caption",
                        "One series per captioning model and prompt; CLIP reads 75 tokens (about 55 words) a chunk.")


def sizes(con) -> str:
    dims = rows(con, "SELECT width, height, bucket_width, bucket_height FROM chosen USING SAMPLE 20000 ROWS")
    out = rp.histogram("aspect", {"images": [math.log2(r["width"] / r["height"]) for r in dims]}, "aspect ratios",
                       "log2(width / height): 0 square, 1 twice as wide, -1 twice as tall",
                       "A sample of up to 20,000 images.")
    out += rp.scatter("resolution", [r["width"] for r in dims], [r["height"] for r in dims], "resolution",
                      "Width against height (a sample of up to 20,000 images).")
    buckets = rows(con, "SELECT bucket_width || 'x' || bucket_height AS bucket, count(*) AS n FROM chosen "
                        "WHERE bucket_width IS NOT NULL GROUP BY bucket_width, bucket_height "
                        "ORDER BY bucket_width / bucket_height DESC")
    if buckets:
        out += rp.bars("buckets", [b["bucket"] for b in buckets], [b["n"] for b in buckets], "images per bucket",
                       "bucket (width x height), wide to tall", "The aspect bucket each image trains in.")
    return out


def watermarks(ds: Dataset, con) -> str:
    share = rows(con, "SELECT CASE WHEN has_watermark THEN 'watermark' WHEN NOT has_watermark THEN 'clean' "
                      "ELSE 'not checked' END AS verdict, count(*) AS n FROM chosen GROUP BY ALL ORDER BY verdict")
    out = rp.bars("watermarks", [s["verdict"] for s in share], [s["n"] for s in share], "watermark verdicts", "",
                  "has_watermark from the detector (or a hand edit).", color=rp.RED)
    marked = rows(con, "SELECT image_id, watermark_boxes AS boxes, watermark_score FROM chosen WHERE has_watermark "
                       f"ORDER BY watermark_score DESC, image_id LIMIT {SAMPLES}")
    if marked:
        out += "<h3>the most confident detections, boxes drawn</h3>" + rp.thumbnails(
            ds, marked, lambda m: f"score {m['watermark_score']:.2f}")
    return out


def duplicates(ds: Dataset, con) -> str:
    groups = duplicate_groups(ds).to_pylist()
    chosen = {r[0] for r in con.sql("SELECT image_id FROM chosen").fetchall()}
    by_group: dict[int, list[dict]] = {}
    for member in groups:
        by_group.setdefault(member["group"], []).append(member)
    kept = {g: m for g, m in by_group.items() if any(x["image_id"] in chosen for x in m)}
    exact = sum(1 for m in kept.values() if m[0]["kind"] == "exact")
    out = table_html([{"exact groups (same bytes)": exact, "near groups (phash)": len(kept) - exact,
                       "images in near groups": sum(len(m) for m in kept.values() if m[0]["kind"] == "near")}])
    if not has_stats(ds):
        out += "<p class=note>near duplicates need perceptual hashes: run <code>curate hash DS</code></p>"
    for g, members in [(g, m) for g, m in kept.items() if m[0]["kind"] == "near"][:SAMPLES]:
        out += f"<h3>near group {g}</h3>" + rp.thumbnails(ds, members, lambda m: f"{m['distance']} bits")
    return out


def quality_fit(ds: Dataset, con) -> str:
    models = [r[0] for r in con.sql("SELECT DISTINCT model FROM quality ORDER BY model").fetchall()]
    heads = [Path(m.removeprefix("quality:").rsplit("#", 1)[0]) for m in models]
    heads += [] if ds.remote else [ds.root / "heads" / "quality"]  # `curate quality fit` writes it beside a local one
    head = next((h for h in heads if (h / "ranks.png").is_file()), None)
    if head is None:
        return "<p class=note>no quality fit found: <code>curate quality fit DS</code> writes heads/quality</p>"
    fit = json.loads((head / "head.json").read_text()).get("fit", {}) if (head / "head.json").is_file() else {}
    facts = {k: v for k, v in fit.items() if k not in ("settings", "rank_histogram", "elo_edges")}
    png = base64.b64encode((head / "ranks.png").read_bytes()).decode()
    return (f'<figure class="plot" data-plot="elo"><img alt="ELO ratings and ranks" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(str(head))}: the tournament's ELO ratings with the rank edges, and images per "
            f"rank</figcaption></figure>" + table_html([facts] if facts else []))


def training(ds: Dataset, base: str | None, config: TrainConfig) -> str:
    """`curate train --dry-run` in pictures (config.where is the report's --where)."""
    if not base:
        return ("<p class=note>pass <code>--base MODEL</code> (the model you will train, as for <code>curate train"
                "</code>) to see the dry run: padded prompt lengths per batch and tags per prompt</p>")
    try:
        train_rows, _ = split_rows(load_rows(ds, config), config)
    except ValueError as e:
        return f"<p class=note>{html.escape(str(e))}</p>"
    data = TrainData(train_rows, config, pipeline_tokenizer(base))
    result = dry_run_report(data)
    out = rp.bars("padded", list(result["padded_lengths"]), list(result["padded_lengths"].values()),
                  "padded prompt length per batch", "tokens (75 a chunk)",
                  f"{len(train_rows)} training rows in {result['batches']} batches of {config.batch_size} (epoch 0).",
                  counted="batches")
    out += rp.bars("tag-counts", list(result["tag_counts"]), list(result["tag_counts"].values()), "tags per tag prompt",
                   "tags", "How many tags each prompt of epoch 0 kept (tag_count draws, priority tags).",
                   counted="prompts")
    return out + "<h3>example prompt per rule</h3>" + table_html(
        [{"rule": k, "prompt": v or "(empty: unconditional)"} for k, v in result["examples"].items()])
