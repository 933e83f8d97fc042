"""Thumbnails, made once and kept in the dataset's cache folder (`DS/cache/thumbs/ab/<image_id>.jpg`;
a local folder for a dataset in object storage, curate.store.Dataset.cache_dir).

An image id is the hash of its bytes, so a thumbnail never goes stale. They are made on
first need, a batch at a time: one pass over the images table finds the bytes of every
image of the batch (reading only the row groups that hold them), JPEGs are draft-decoded
at the smallest scale that still fills the thumbnail, and decoding runs on a few threads.
A thumbnail is written aside and renamed, so a reader never sees half of one.
"""
from __future__ import annotations

import io
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.compute as pc
from PIL import Image

from curate.images import ImageError, decode, decode_threads
from curate.storage import LOCATOR_COLUMNS, holds_image, image_data
from curate.store import Dataset

SIDE = 256  # fits in SIDE x SIDE
QUALITY = 85


def thumb_path(ds: Dataset, image_id: str) -> Path:
    return ds.cache_dir / "thumbs" / image_id[:2] / f"{image_id}.jpg"


def make_thumbs(ds: Dataset, image_ids: list[str]) -> dict[str, Path | None]:
    """The thumbnail of each image, making those that are missing; None for an image that
    has no decodable bytes (not in the dataset, or an error row)."""
    out = {i: thumb_path(ds, i) for i in image_ids}
    missing = {i for i, path in out.items() if not path.exists()}
    if not missing:
        return out
    found: dict[str, dict] = {}
    for batch in ds.scan("images", ["image_id", "bytes", "size_bytes", *LOCATOR_COLUMNS], ids=missing,
                         filter=pc.field("image_id").isin(list(missing)) & holds_image()):
        for row in batch.to_pylist():
            found.setdefault(row["image_id"], row)
    with ThreadPoolExecutor(decode_threads()) as pool:
        made = dict(zip(found, pool.map(lambda item: _write(ds, *item), found.items())))
    for image_id in missing:
        out[image_id] = made.get(image_id)
    return out


def _write(ds: Dataset, image_id: str, row: dict) -> Path | None:
    try:  # a referenced image is read where it is (a thread each: from object storage reads wait)
        image = decode(image_data(row), long_side=SIDE).image
    except ImageError:
        return None
    image.thumbnail((SIDE, SIDE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=QUALITY)
    path = thumb_path(ds, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}.jpg")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


class Thumbnailer:
    """Thumbnails for a page's server: the ids a page is about to ask for are announced
    (`want`), and the first request for any missing one makes all of them in one batch,
    while the page's other requests wait for that batch instead of each scanning the table."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.lock = threading.Lock()
        self.wanted: list[str] = []

    def want(self, image_ids: list[str]) -> None:
        with self.lock:
            self.wanted = list(image_ids)

    def cached(self, image_id: str) -> bool:
        return thumb_path(self.ds, image_id).exists()

    def get(self, image_id: str) -> bytes | None:
        path = thumb_path(self.ds, image_id)
        if not path.exists():
            with self.lock:
                if not path.exists():
                    batch = [image_id] + [i for i in self.wanted if i != image_id]
                    self.wanted = []
                    path = make_thumbs(self.ds, batch)[image_id]
        return path.read_bytes() if path is not None and path.exists() else None
