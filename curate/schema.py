"""The columns of every table, defined once.

Each stage owns one table. Every stage table carries the same bookkeeping columns
(`STAGE_COLUMNS`): which image, which model and settings produced the row, whether it
worked, and when. `data/README.md` documents every column; keep the two in step.

Columns are declared as plain data (a name, a type written as text, nullability) that both
pyarrow and DuckDB types are read from: a command that only runs SQL over the tables
(`curate sql`, `curate info`) then starts without importing pyarrow (about a tenth of a
second). `SCHEMAS`, the Arrow schemas, are built the first time something asks for them.
"""
from __future__ import annotations

import functools
from typing import NamedTuple


class Column(NamedTuple):
    name: str
    type: str  # string, binary, bool, int8/32/64, uint64, float16/32, timestamp (us, UTC), box, list<T>
    nullable: bool = True


# One row per image per model; `model` says which model and settings produced it.
STAGE_COLUMNS = [
    Column("image_id", "string", nullable=False),
    Column("model", "string", nullable=False),
    Column("status", "string", nullable=False),  # 'ok' or 'error'
    Column("error", "string"),  # a code from ERROR_CODES when status='error'
    Column("message", "string"),  # free text for people
    Column("created_at", "timestamp", nullable=False),
]

# The fixed list of error codes. A row with status='error' carries exactly one.
ERROR_CODES = {
    # reading the file
    "not_regular_file": "a directory, FIFO, device or socket where an image was expected",
    "unreadable": "the file could not be read (permissions, I/O error, broken or looping symlink)",
    "too_large": "the file is over the size cap",
    "empty": "the file has zero bytes",
    # decoding
    "unidentified": "the bytes are not an image format Pillow knows",
    "truncated": "the image data ends early or is corrupt",
    "decompression_bomb": "the declared pixel count is over the cap",
    "zero_size": "the image declares a width or height of zero",
    "unsupported_mode": "a pixel mode that cannot be converted to RGB",
    # archives
    "unsafe_path": "a tar member whose name escapes the archive (absolute or ..)",
    # imports
    "bad_sidecar": "a caption or tags file that comes with an image cannot be read (not UTF-8, bad YAML or JSON)",
    # stages
    "prepare_failed": "the stage could not prepare this image for its model",
    "process_failed": "the model failed on this image (the rest of its batch went on)",
    "worker_died": "the worker process died while holding this image",
    "bad_output": "the model returned output that cannot be stored (NaN, empty, garbage)",
    "too_small": "the image is smaller than every bucket",
}


def stage_columns(*columns: Column) -> list[Column]:
    return STAGE_COLUMNS + list(columns)


# A watermark box: the `box` type
BOX = [Column("x0", "float32"), Column("y0", "float32"), Column("x1", "float32"), Column("y1", "float32"),
       Column("score", "float32")]

TABLES: dict[str, list[Column]] = {
    # One row per source file. Exact duplicates share an image_id; only the first row
    # of an image_id carries the bytes, so the dataset stores each image once.
    "images": [
        Column("image_id", "string"),  # sha256 of the file's bytes; null if unreadable
        Column("source", "string", nullable=False),
        Column("bytes", "binary"),
        Column("size_bytes", "int64"),
        Column("width", "int32"),  # after EXIF orientation
        Column("height", "int32"),
        Column("format", "string"),
        Column("mode", "string"),
        Column("animated", "bool"),
        Column("status", "string", nullable=False),
        Column("error", "string"),
        Column("message", "string"),
        Column("created_at", "timestamp", nullable=False),
    ],
    "stats": stage_columns(
        Column("phash", "uint64"),
        Column("brightness", "float32"),
        Column("sharpness", "float32"),
        Column("colorfulness", "float32"),
        Column("entropy", "float32"),
    ),
    "embeddings": stage_columns(Column("embedding", "list<float16>")),
    "quality": stage_columns(Column("rank", "int8"), Column("probs", "list<float32>")),
    "tags": stage_columns(
        Column("tags", "list<string>"),  # as the model names them, most confident first
        Column("tag_scores", "list<float32>"),  # one per tag
        Column("rating", "string"),  # the most probable rating tag (general, sensitive, ...)
        Column("rating_score", "float32"),
    ),
    "captions": stage_columns(
        Column("prompt", "string"),
        Column("caption", "string"),
        Column("raw", "string"),
    ),
    # One row per image per image classifier (model); several classifiers side by side.
    "classifications": stage_columns(
        Column("classifier", "string"),  # its short name: the repo's or directory's (the manifest's map key)
        Column("labels", "list<string>"),  # every label, in the model's order
        Column("scores", "list<float32>"),  # each label's probability (softmax, or sigmoid if multi-label)
        Column("label", "string"),  # the most probable label
        Column("score", "float32"),
    ),
    "watermarks": stage_columns(
        Column("score", "float32"),
        Column("has_watermark", "bool"),
        Column("boxes", "list<box>"),  # normalised to the original image, 0..1
    ),
    "buckets": stage_columns(Column("bucket_width", "int32"), Column("bucket_height", "int32")),
    # model = the VAE id and encode settings. The latent is the VAE's output before
    # scaling (the trainer multiplies by scaling_factor), float16, C*H*W row-major.
    "latents": stage_columns(
        Column("latent", "binary"),
        Column("shape", "list<int32>"),  # [C, H, W]
        Column("scaling_factor", "float32"),
        Column("original_height", "int32"),  # the image after EXIF orientation
        Column("original_width", "int32"),
        Column("resized_height", "int32"),  # after the Lanczos downscale, before the crop
        Column("resized_width", "int32"),
        Column("crop_top", "int32"),  # top-left of the crop in the resized image
        Column("crop_left", "int32"),
        Column("target_height", "int32"),  # the bucket
        Column("target_width", "int32"),
        Column("mean", "binary"),  # with --keep-distribution: float16 C*H*W
        Column("logvar", "binary"),
        Column("vae", "string"),  # the VAE and dtype that encoded this row (differs per row with --mixed-vae)
        Column("shift_factor", "float32"),  # null for SD/SDXL VAEs; the trainer uses (latent - shift) * scale
        # with --flip: the mirrored crop's latent (and moments), and its crop's left in the flipped image
        Column("flip_latent", "binary"),
        Column("flip_mean", "binary"),
        Column("flip_logvar", "binary"),
        Column("flip_crop_left", "int32"),
    ),
    # Hand edits from `curate view`: one row per image per action, never rewritten. The
    # manifest applies the latest live edit of each kind per image (see EDIT_ACTIONS).
    "edits": [
        Column("edit", "string", nullable=False),  # one id per action: a bulk edit's rows share it
        Column("image_id", "string"),  # null on 'undo' rows
        Column("action", "string", nullable=False),  # one of EDIT_ACTIONS
        Column("value", "string"),  # the tag, the caption, or the edit an 'undo' cancels
        Column("editor", "string"),
        Column("created_at", "timestamp", nullable=False),
    ],
    # Head-to-head judgements for the quality head.
    "ratings": [
        Column("left", "string", nullable=False),
        Column("right", "string", nullable=False),
        Column("winner", "string", nullable=False),  # 'left', 'right' or 'tie'
        Column("rater", "string"),
        Column("created_at", "timestamp", nullable=False),
    ],
}

# What a hand edit does (`edits.action`). Per image, the latest live exclude/include decides
# `excluded`, the latest live caption replaces the caption, and per image and tag the latest
# live add_tag/remove_tag decides whether the tag is in `tags`. An 'undo' row cancels every
# row of the edit named in its value, so the edit before it counts again.
EDIT_ACTIONS = {
    "exclude": "leave the image out of the manifest: no stage, no --where and no training sees it",
    "include": "take an excluded image back",
    "add_tag": "add the tag in value",
    "remove_tag": "remove the tag in value (removing `watermark` also clears has_watermark and its boxes)",
    "caption": "replace the caption with value",
    "undo": "cancel the edit whose id is in value",
}

# What each stage table adds to the `manifest` view (one row per ok image, joined with
# the latest ok row of each stage table). SQL expressions; the table's name is its alias.
MANIFEST_COLUMNS: dict[str, list[str]] = {
    "stats": ["stats.phash", "stats.brightness", "stats.sharpness", "stats.colorfulness", "stats.entropy"],
    "quality": ["quality.rank"],
    # OWLv2's verdict joins the tags as `watermark`, so prompts and filters see one tag list.
    "tags": [
        "CASE WHEN watermarks.has_watermark "
        "AND NOT list_contains(coalesce(tags.tags, CAST([] AS VARCHAR[])), 'watermark') "
        "THEN list_append(coalesce(tags.tags, CAST([] AS VARCHAR[])), 'watermark') ELSE tags.tags END AS tags",
        "tags.rating",
    ],
    "captions": ["captions.caption"],
    "classifications": ["classifications.classes"],
    "watermarks": [
        "watermarks.has_watermark",
        "watermarks.score AS watermark_score",
        "watermarks.boxes AS watermark_boxes",
    ],
    "buckets": ["buckets.bucket_width", "buckets.bucket_height"],
    "latents": ["latents.image_id IS NOT NULL AS has_latent"],
}

# Tables that join the manifest through a query of their own instead of their latest ok row:
# every classifier's latest ok row, as one map from 'CLASSIFIER/LABEL' to the label's probability
# (`classes['nsfw_image_detection/nsfw'] > 0.8`). Written without lambdas, which DuckDB spells
# differently across versions.
MANIFEST_SOURCES: dict[str, str] = {
    "classifications": (
        "SELECT image_id, map_from_entries(list(struct_pack(k := classifier || '/' || label, v := score) "
        "ORDER BY classifier, label)) AS classes FROM ("
        "SELECT image_id, classifier, unnest(labels) AS label, unnest(scores) AS score FROM ("
        "SELECT * FROM classifications WHERE status = 'ok' "
        "QUALIFY row_number() OVER (PARTITION BY image_id, classifier ORDER BY created_at DESC) = 1)) "
        "GROUP BY image_id"),
}

DUCKDB_TYPES = {"string": "VARCHAR", "binary": "BLOB", "bool": "BOOLEAN", "int8": "TINYINT", "int32": "INTEGER",
                "int64": "BIGINT", "uint64": "UBIGINT", "float16": "FLOAT", "float32": "FLOAT",
                "timestamp": "TIMESTAMPTZ"}
ARROW_TYPES = {"string": "string", "binary": "binary", "bool": "bool_", "int8": "int8", "int32": "int32",
               "int64": "int64", "uint64": "uint64", "float16": "float16", "float32": "float32"}


def duckdb_type(type_: str) -> str:
    """A column type as DuckDB spells it (float16 is read as FLOAT)."""
    if type_.startswith("list<"):
        return duckdb_type(type_[5:-1]) + "[]"
    if type_ == "box":
        return "STRUCT(" + ", ".join(f'"{c.name}" {duckdb_type(c.type)}' for c in BOX) + ")"
    return DUCKDB_TYPES[type_]


def arrow_type(type_: str):
    import pyarrow as pa

    if type_.startswith("list<"):
        return pa.list_(arrow_type(type_[5:-1]))
    if type_ == "box":
        return pa.struct([(c.name, arrow_type(c.type)) for c in BOX])
    if type_ == "timestamp":
        return pa.timestamp("us", tz="UTC")
    return getattr(pa, ARROW_TYPES[type_])()


@functools.cache
def arrow_schemas() -> dict:
    """table -> pyarrow.Schema"""
    import pyarrow as pa

    return {name: pa.schema([pa.field(c.name, arrow_type(c.type), c.nullable) for c in columns])
            for name, columns in TABLES.items()}


def __getattr__(name: str):
    if name == "SCHEMAS":  # `from curate.schema import SCHEMAS` builds them on first use
        return arrow_schemas()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
