"""`curate buckets`: every image's aspect bucket, from its size alone (no decoding).

Sizes come from the `manifest` view, so only the size columns are read, never the image
bytes. The `model` column is the bucket set's name (plus `+upscale`): buckets of two sets
live side by side, and running again does only the images still without a row.
"""
from __future__ import annotations

import time

from curate.buckets import BucketSet, choose_bucket, too_small_reason
from curate.images import ImageError
from curate.manifest import Dataset
from curate.progress import progress_bar
from pipelines.runner import PartWriter, Summary, process_rows, todo_ids
from pipelines.stage import Stage

CHUNK = 4096


class BucketStage(Stage):
    table = "buckets"
    columns = ("image_id", "width", "height")

    def __init__(self, bucket_set: BucketSet, allow_upscale: bool = False):
        self.bucket_set, self.allow_upscale = bucket_set, allow_upscale

    def model_key(self) -> str:
        return self.bucket_set.name + ("+upscale" if self.allow_upscale else "")

    def prepare(self, row):
        bucket = choose_bucket(row["width"], row["height"], self.bucket_set.buckets, self.allow_upscale)
        if bucket is None:
            raise ImageError("too_small", too_small_reason(row["width"], row["height"], self.bucket_set))
        return {"bucket_width": bucket[0], "bucket_height": bucket[1]}

    def process(self, batch):
        return {"bucket_width": list(batch["bucket_width"]), "bucket_height": list(batch["bucket_height"])}


def assign_buckets(ds: Dataset, bucket_set: BucketSet, where: str | None = None, allow_upscale: bool = False,
                   show_progress: bool = True) -> Summary:
    started = time.perf_counter()
    stage = BucketStage(bucket_set, allow_upscale)
    todo = set(todo_ids(ds, stage, where))
    summary = Summary(stage.table, stage.model_key(), todo=len(todo))
    if todo:
        rows = [r for r in ds.query("SELECT image_id, width, height FROM manifest ORDER BY image_id").to_pylist()
                if r["image_id"] in todo]
        with progress_bar(f"buckets [{stage.model_key()}]", len(rows), enabled=show_progress) as advance, \
                PartWriter(ds, stage.table) as writer:
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start:start + CHUNK]
                table = process_rows(stage, [r["image_id"] for r in chunk], [_prepare(stage, r) for r in chunk])
                writer.add(table)
                for status, error in zip(table.column("status").to_pylist(), table.column("error").to_pylist()):
                    if status == "ok":
                        summary.ok += 1
                    else:
                        summary.errors[error] += 1
                advance(len(chunk))
    summary.seconds = time.perf_counter() - started
    return summary


def _prepare(stage: BucketStage, row: dict) -> dict:
    try:
        return stage.prepare(row)
    except ImageError as e:
        return {"_error": e.code, "_message": e.message}
