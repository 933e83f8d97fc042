"""`curate buckets`: every image's aspect bucket, from its size alone (no decoding).

Only the size columns of the images table are read, never the image bytes. The `model`
column is the bucket set's name (plus `+upscale`): buckets of two sets live side by side,
and running again does only the images still without a row.
"""
from __future__ import annotations

from curate.buckets import BucketSet, choose_bucket, too_small_reason
from curate.images import ImageError
from curate.pipelines.executor import Summary, run
from curate.pipelines.stage import Stage
from curate.store import Dataset


class BucketStage(Stage):
    table = "buckets"
    columns = ("image_id", "width", "height")
    batch_size = 4096

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
                   show_progress: bool = True, engine: str = "local", ray_address: str | None = None) -> Summary:
    return run(ds, BucketStage(bucket_set, allow_upscale), where=where, engine=engine, ray_address=ray_address,
               show_progress=show_progress)[0]
