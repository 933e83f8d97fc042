"""Arrow schemas of every table, defined once.

Each stage owns one table. Every stage table carries the same bookkeeping columns
(`STAGE_COLUMNS`): which image, which model and settings produced the row, whether it
worked, and when. `data/README.md` documents every column; keep the two in step.
"""
from __future__ import annotations

import pyarrow as pa

# One row per image per model; `model` says which model and settings produced it.
STAGE_COLUMNS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # 'ok' or 'error'
    pa.field("error", pa.string()),  # a code from ERROR_CODES when status='error'
    pa.field("message", pa.string()),  # free text for people
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
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


def stage_schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema(STAGE_COLUMNS + list(fields))


BOX = pa.struct(
    [("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()), ("score", pa.float32())]
)

SCHEMAS: dict[str, pa.Schema] = {
    # One row per source file. Exact duplicates share an image_id; only the first row
    # of an image_id carries the bytes, so the dataset stores each image once.
    "images": pa.schema(
        [
            pa.field("image_id", pa.string()),  # sha256 of the file's bytes; null if unreadable
            pa.field("source", pa.string(), nullable=False),
            pa.field("bytes", pa.binary()),
            pa.field("size_bytes", pa.int64()),
            pa.field("width", pa.int32()),  # after EXIF orientation
            pa.field("height", pa.int32()),
            pa.field("format", pa.string()),
            pa.field("mode", pa.string()),
            pa.field("animated", pa.bool_()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("message", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    "stats": stage_schema(
        pa.field("phash", pa.uint64()),
        pa.field("brightness", pa.float32()),
        pa.field("sharpness", pa.float32()),
        pa.field("colorfulness", pa.float32()),
        pa.field("entropy", pa.float32()),
    ),
    "embeddings": stage_schema(pa.field("embedding", pa.list_(pa.float16()))),
    "quality": stage_schema(pa.field("rank", pa.int8()), pa.field("probs", pa.list_(pa.float32()))),
    "tags": stage_schema(
        pa.field("tags", pa.list_(pa.string())),  # as the model names them, most confident first
        pa.field("tag_scores", pa.list_(pa.float32())),  # one per tag
        pa.field("rating", pa.string()),  # the most probable rating tag (general, sensitive, ...)
        pa.field("rating_score", pa.float32()),
    ),
    "captions": stage_schema(
        pa.field("prompt", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("raw", pa.string()),
    ),
    "watermarks": stage_schema(
        pa.field("score", pa.float32()),
        pa.field("has_watermark", pa.bool_()),
        pa.field("boxes", pa.list_(BOX)),  # normalised to the original image, 0..1
    ),
    "buckets": stage_schema(pa.field("bucket_width", pa.int32()), pa.field("bucket_height", pa.int32())),
    # model = the VAE id and encode settings. The latent is the VAE's output before
    # scaling (the trainer multiplies by scaling_factor), float16, C*H*W row-major.
    "latents": stage_schema(
        pa.field("latent", pa.binary()),
        pa.field("shape", pa.list_(pa.int32())),  # [C, H, W]
        pa.field("scaling_factor", pa.float32()),
        pa.field("original_height", pa.int32()),  # the image after EXIF orientation
        pa.field("original_width", pa.int32()),
        pa.field("resized_height", pa.int32()),  # after the Lanczos downscale, before the crop
        pa.field("resized_width", pa.int32()),
        pa.field("crop_top", pa.int32()),  # top-left of the crop in the resized image
        pa.field("crop_left", pa.int32()),
        pa.field("target_height", pa.int32()),  # the bucket
        pa.field("target_width", pa.int32()),
        pa.field("mean", pa.binary()),  # with --keep-distribution: float16 C*H*W
        pa.field("logvar", pa.binary()),
        pa.field("vae", pa.string()),  # the VAE and dtype that encoded this row (differs per row with --mixed-vae)
        pa.field("shift_factor", pa.float32()),  # null for SD/SDXL VAEs; the trainer uses (latent - shift) * scale
    ),
    # Head-to-head judgements for the quality head.
    "ratings": pa.schema(
        [
            pa.field("left", pa.string(), nullable=False),
            pa.field("right", pa.string(), nullable=False),
            pa.field("winner", pa.string(), nullable=False),  # 'left', 'right' or 'tie'
            pa.field("rater", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
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
    "watermarks": [
        "watermarks.has_watermark",
        "watermarks.score AS watermark_score",
        "watermarks.boxes AS watermark_boxes",
    ],
    "buckets": ["buckets.bucket_width", "buckets.bucket_height"],
    "latents": ["latents.image_id IS NOT NULL AS has_latent"],
}
