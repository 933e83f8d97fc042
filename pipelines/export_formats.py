"""The file layouts `curate export` writes (pipelines/export.py drives them; the sharded
ones, webdataset and parquet, are in pipelines/export_shards.py):

- kohya: `images/<image_id>.<ext>` with `<image_id>.txt` beside each (sd-scripts' caption
  format: one line; with `--prompt both` `CAPTION ||| tag, tag`, the caption kept and the
  tags shuffled through `keep_tokens_separator`), and `dataset.toml`, an sd-scripts
  `--dataset_config` (resolution and bucketing from the images' buckets, one subset).
- imagefolder: `<image_id>.<ext>` and `metadata.jsonl` (`file_name`, `text`, `caption`,
  `tags`, `image_id`, `source`): what `datasets.load_dataset("imagefolder", data_dir=DEST)` reads.

Images keep their bytes and format; a file is named by its image_id, so exports never
collide and join back to the dataset.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections import deque
from pathlib import Path

import pyarrow as pa

from curate.store import TMP_PREFIX

KEEP_TOKENS_SEPARATOR = "|||"
TEXT_COLUMNS = ("image_id", "format", "caption", "tags", "source")  # what file names and text need
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
              "AVIF": "avif", "HEIF": "heic", "JPEG2000": "jp2", "ICO": "ico", "PPM": "ppm", "TGA": "tga"}


def extension(fmt: str | None) -> str:
    if fmt in EXTENSIONS:
        return EXTENSIONS[fmt]
    from PIL import Image

    return next((ext[1:] for ext, f in Image.registered_extensions().items() if f == fmt), "img")


def file_name(item: dict) -> str:
    return f"{item['image_id']}.{extension(item['format'])}"


def prompt_text(item: dict, prompt: str, kohya: bool = False) -> str:
    """The text a trainer reads: the caption, the tags (comma-separated, as stored) or both."""
    caption = " ".join((item["caption"] or "").split())
    tags = ", ".join(item["tags"] or [])
    if prompt == "caption":
        return caption
    if prompt == "tags":
        return tags
    if kohya:
        return f"{caption} {KEEP_TOKENS_SEPARATOR} {tags}".strip() if caption or tags else ""
    if not caption or not tags:
        return caption or tags
    return f"{caption}{' ' if caption[-1] in '.!?' else ', '}{tags}"


_numbers = itertools.count()  # temporary names: the pid and a number are unique (next() holds the GIL)


def temporary(path: Path | str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f"{TMP_PREFIX}{os.getpid()}-{next(_numbers)}-{name}")


def write_atomic(path: Path | str, data) -> None:
    """Write under a temporary name, then rename: readers see the whole file or none. Plain
    system calls (no file object): an export writes two files per image, and the per-file
    overhead, not the bytes, is most of its cost. No fsync (as `cp`): a killed export never
    leaves a partial file under its name, and after a power loss the next export writes again
    an image file of the wrong size and a caption file of the wrong text."""
    tmp = temporary(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_atomic(source: str, path: Path | str, mode: str) -> None:
    tmp = temporary(path)
    if mode == "hard":
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno == 18:  # EXDEV
                raise OSError(f"cannot hard-link {source} into {path.parent}: another file system; "
                              "use --link sym or --link copy") from None
            raise
    else:
        os.symlink(os.path.abspath(source), tmp)
    os.replace(tmp, path)


class RowIndex:
    """The selected manifest rows by image_id: as dicts a batch at a time, or as Arrow."""

    def __init__(self, manifest: pa.Table):
        self.manifest = manifest
        self.position = {i: n for n, i in enumerate(manifest.column("image_id").to_pylist())}

    def table(self, ids: list[str]) -> pa.Table:
        return self.manifest.take(pa.array([self.position[i] for i in ids], pa.int64()))

    def take(self, ids: list[str]) -> list[dict]:
        return self.table(ids).to_pylist()

    def batches(self, size: int = 4096, columns: tuple[str, ...] = TEXT_COLUMNS):
        """The rows, `columns` only (every row becomes a dict: the others would cost time)."""
        table = self.manifest.select(list(columns))
        for start in range(0, table.num_rows, size):
            yield table.slice(start, size).to_pylist()


class Writer:
    """One export layout: what is there already, adding images, and the files written last."""

    files = True  # one file per image (so --link works)
    all_columns = False  # needs every manifest column

    def __init__(self, dest: Path, prompt: str, shard_bytes: int, rows: RowIndex):
        self.dest, self.prompt, self.shard_bytes, self.rows = dest, prompt, shard_bytes, rows

    def folders(self) -> list[Path]:
        return [self.dest]

    def exported(self) -> set[str]:
        raise NotImplementedError

    def add(self, items: list[dict], blobs: list, pool) -> None:
        raise NotImplementedError

    def link(self, item: dict, source: str, mode: str) -> None:
        raise NotImplementedError

    def finish(self) -> dict:
        return {}


class FileWriter(Writer):
    """A file per image in `images`, written by the pool; `before_image` runs first."""

    subfolder = ""
    per_task = 8  # images a pool task writes: fewer futures to make and wait on

    def __init__(self, *args):
        super().__init__(*args)
        self.images = self.dest / self.subfolder
        self.images.mkdir(exist_ok=True)
        self.folder = str(self.images)
        self.pending: deque = deque()  # writes in flight
        self.before: set[str] = set()  # the images there before this run (see exported)
        self.added: set[str] = set()  # and those this run wrote or linked

    def folders(self) -> list[Path]:
        return [self.dest, self.images]

    def exported(self) -> set[str]:
        folder = self.images
        sizes = dict(zip(self.rows.manifest.column("image_id").to_pylist(),
                         self.rows.manifest.column("size_bytes").to_pylist()))
        there = set()
        for entry in os.scandir(folder) if folder.is_dir() else []:
            stem, _, ext = entry.name.partition(".")
            if len(stem) == 64 and ext != "txt" and not entry.name.startswith("."):
                try:
                    size = entry.stat().st_size  # follows a symlink to its source
                except OSError:
                    continue
                if sizes.get(stem, size) == size:  # a file cut short by a crash is written again
                    there.add(stem)
        self.before = there
        return there

    def there(self) -> set[str]:
        """The images in DEST once this run's writes are done."""
        self.wait()
        return self.before | self.added

    def before_image(self, item: dict) -> None:
        pass

    def add(self, items: list[dict], blobs: list, pool) -> None:
        """Hand the writes to the pool and return: the next batch is read while these are
        written. At most two batches wait (their bytes stay in memory until written)."""
        pairs = list(zip(items, blobs))
        tasks = [pairs[start:start + self.per_task] for start in range(0, len(pairs), self.per_task)]
        self.pending.extend(pool.submit(self.write, task) for task in tasks)
        while len(self.pending) > 2 * len(tasks):
            self.pending.popleft().result()

    def write(self, pairs: list[tuple[dict, object]]) -> None:
        for item, blob in pairs:
            self.before_image(item)
            write_atomic(f"{self.folder}/{file_name(item)}", blob)
            self.added.add(item["image_id"])

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def link(self, item: dict, source: str, mode: str) -> None:
        self.before_image(item)
        link_atomic(source, f"{self.folder}/{file_name(item)}", mode)
        self.added.add(item["image_id"])


class Kohya(FileWriter):
    subfolder = "images"

    def before_image(self, item: dict, refresh: bool = False) -> None:
        """The caption file first: an image on disk always has its caption. `refresh`: an
        image exported before, whose caption file is rewritten only if its text changed."""
        path = f"{self.folder}/{item['image_id']}.txt"
        text = prompt_text(item, self.prompt, kohya=True) + "\n"
        if refresh:
            try:
                if Path(path).read_text(encoding="utf-8") == text:
                    return
            except OSError:
                pass
        write_atomic(path, text.encode("utf-8"))

    def finish(self) -> dict:
        self.wait()
        for batch in self.rows.batches() if self.before else []:  # captions exported before may have changed
            for item in batch:
                if item["image_id"] in self.before:
                    self.before_image(item, refresh=True)
        write_atomic(self.dest / "dataset.toml", kohya_toml(self.images, self.prompt, self.rows.manifest))
        return {"config": str(self.dest / "dataset.toml")}


def kohya_toml(images_dir: Path, prompt: str, manifest: pa.Table) -> bytes:
    """sd-scripts' dataset config (docs/config_README-en.md): resolution and bucket limits
    from the images' buckets (SDXL's when none were assigned), no upscaling (as `curate
    buckets`), the tags shuffled, the caption kept in front."""
    widths = [w for w in manifest.column("bucket_width").to_pylist() if w]
    heights = [h for h in manifest.column("bucket_height").to_pylist() if h]
    areas = [w * h for w, h in zip(widths, heights)]
    resolution = int(round(math.sqrt(max(areas)) / 64) * 64) if areas else 1024
    low = min(widths + heights) // 64 * 64 if areas else 512
    high = -(-max(widths + heights) // 64) * 64 if areas else 2048
    general = {"caption_extension": ".txt", "shuffle_caption": prompt != "caption"}
    if prompt == "both":
        general["keep_tokens_separator"] = KEEP_TOKENS_SEPARATOR
    dataset = {"resolution": resolution, "enable_bucket": True, "bucket_no_upscale": True, "bucket_reso_steps": 64,
               "min_bucket_reso": max(64, low), "max_bucket_reso": high}
    lines = ["# sd-scripts dataset config written by `curate export --format kohya`:",
             "#   accelerate launch sdxl_train.py --dataset_config dataset.toml ...", "", "[general]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in general.items()]
    lines += ["", "[[datasets]]"] + [f"{k} = {toml_value(v)}" for k, v in dataset.items()]
    lines += ["", "  [[datasets.subsets]]", f"  image_dir = {toml_value(str(images_dir.resolve()))}",
              "  num_repeats = 1", ""]
    return "\n".join(lines).encode("utf-8")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    return str(v)


class ImageFolder(FileWriter):
    def finish(self) -> dict:
        """metadata.jsonl of every image in DEST: this run's rows, and earlier runs' lines for
        images no longer selected."""
        path = self.dest / "metadata.jsonl"
        there = self.there()
        lines = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record.get("image_id") in there:
                    lines[record["image_id"]] = line
        for batch in self.rows.batches():
            for item in batch:
                if item["image_id"] in there:
                    lines[item["image_id"]] = json.dumps({
                        "file_name": file_name(item), "text": prompt_text(item, self.prompt),
                        "caption": item["caption"], "tags": item["tags"], "image_id": item["image_id"],
                        "source": item["source"]}, ensure_ascii=False)
        write_atomic(path, "".join(line + "\n" for _, line in sorted(lines.items())).encode("utf-8"))
        return {"metadata": str(path)}
