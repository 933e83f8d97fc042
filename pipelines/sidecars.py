"""The captions and tags users already have, read at ingest from the files that come with
their images, into `captions` and `tags` rows that the manifest, `--where` and the trainer
use as they use a model's.

Where the text is (for an image `x.jpg`):
- beside it in a folder: `x.yaml`/`x.yml` (EveryDream2: `main_prompt`, `tags` with weights),
  `x.json` (img2dataset's files layout: `caption`, optionally `tags`), `x.txt` and
  `x.caption` (kohya sd-scripts, EveryDream2, OneTrainer);
- in a tar (webdataset, img2dataset): the other members of its sample, the files that
  follow one another under the same key (the name up to the first dot of its base name);
- img2dataset's parquet beside a shard or a folder of samples (`00000.parquet` for
  `00000.tar` or `00000/`): the `caption` of the row whose `key` is the sample's;
- a Hugging Face dataset row: its caption and tags columns (pipelines/hf_source.py).

An image gets at most one captions row and one tags row per ingest, each from the first
file in that order that has one; a file whose whole text is the caption already read is
skipped (img2dataset writes it to both `.json` and `.txt`). A `.txt`/`.caption` file is
read as `--sidecar-text` says; `auto`:
`CAPTION ||| tag, tag` (sd-scripts' keep_tokens_separator, what `curate export --format
kohya` writes) splits at the bars; three or more comma-separated pieces that are all short
(at most four words, no sentence end) are tags; a long first piece followed by such tags is
a caption and tags (EveryDream2's reading); anything else is a caption.

The driver names side files while it walks (nothing is read); workers read and parse them
with their image (`read_sides`); the driver writes what is new (`SideImports`). A row's
`message` says which file it came from, and a row is new when its image, file, model value
or text differ from the latest row stored for that image, file and model value: ingesting
again adds nothing, an edited side file adds a row (the latest wins in the manifest), also
when the image itself was stored by an earlier run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.models.families import model_value
from curate.schema import SCHEMAS
from curate.store import Dataset, now

SIDE_EXTENSIONS = (".yaml", ".yml", ".json", ".txt", ".caption")  # the order an image's files are read in
TEXT_READINGS = ("auto", "caption", "tags")
MAX_SIDE_BYTES = 16 << 20
KEEP_TOKENS_SEPARATOR = "|||"  # sd-scripts: what comes before it stays fixed, the tags after it shuffle
_SENTENCE_END = re.compile(r"\w[.!?](\s|$)")


class SideError(Exception):
    """A side file that cannot be read as text, YAML or JSON (a `bad_sidecar` row)."""


def is_side_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in SIDE_EXTENSIONS


# ---- naming side files (driver) --------------------------------------------------------
def folder_sides(path: str, shown: str, names: set[str], records: dict[str, dict]) -> list[dict]:
    """The side files of a folder image `path` (named `shown`) among its folder's file names."""
    folder, name = os.path.split(path)
    stem = os.path.splitext(name)[0]
    shown_stem = os.path.splitext(shown)[0]
    refs = [{"ext": ext, "location": shown_stem + ext, "path": os.path.join(folder, stem + ext)}
            for ext in SIDE_EXTENSIONS if stem + ext in names]
    return refs + record_refs(records, stem)


def img2dataset_records(base: str) -> dict[str, dict]:
    """img2dataset's parquet for a shard or folder (`base` + .parquet): key -> the row of each
    image it downloaded (caption, url, ...); {} when there is none or it is not img2dataset's."""
    path = base + ".parquet"
    try:
        if not os.path.isfile(path) or not {"key", "caption"} <= set(pq.read_schema(path).names):
            return {}
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return {}
    scalar = [f.name for f in table.schema if not (pa.types.is_nested(f.type) or pa.types.is_binary(f.type))]
    rows = table.select(scalar).to_pylist()
    return {str(r["key"]): {"_parquet": path, **r} for r in rows if r.get("status") in (None, "success")}


def record_refs(records: dict[str, dict], key: str) -> list[dict]:
    record = records.get(key)
    if record is None:
        return []
    record = {k: v for k, v in record.items() if k != "_parquet" and v is not None}
    return [{"ext": "img2dataset", "location": f"{records[key]['_parquet']}#{key}",
             "record": json.loads(json.dumps(record, default=str))}]


def sample_key(member: str) -> str:
    """webdataset's key of a tar member: its name up to the first dot of the base name."""
    folder, _, name = member.rpartition("/")
    return (folder + "/" if folder else "") + name.split(".", 1)[0]


def tar_samples(members: Iterator[dict], records: dict[str, dict]) -> Iterator[dict]:
    """A tar's image candidates with their sample's side members attached. webdataset keeps
    a sample's files together, so members are grouped by key as they come: a group's side
    members (candidates marked `side_member`) go to its images, which are yielded then."""
    group: list[dict] = []
    key = None
    for m in members:
        k = sample_key(m["source"].rpartition("::")[2])
        if k != key and group:
            yield from _with_sides(group, key, records)
            group = []
        key = k
        group.append(m)
    if group:
        yield from _with_sides(group, key, records)


def _with_sides(group: list[dict], key: str, records: dict[str, dict]) -> Iterator[dict]:
    sides = sorted((m for m in group if m.get("side_member")), key=lambda m: _precedence(m["ext"]))
    refs = [{k: v for k, v in m.items() if k not in ("side_member", "source")} | {"location": m["source"]}
            for m in sides] + record_refs(records, key)
    for m in group:
        if not m.get("side_member"):
            yield {**m, "side": refs} if refs else m


def _precedence(ext: str) -> int:
    return SIDE_EXTENSIONS.index(ext) if ext in SIDE_EXTENSIONS else len(SIDE_EXTENSIONS)


# ---- reading them (workers) --------------------------------------------------------------
def read_sides(refs: list[dict], image_id: str, text_as: str, read: Callable[[dict], bytes]) -> list[dict]:
    """The captions and tags rows (as dicts) an image's side files give; a file that cannot be
    read or parsed gives a `bad_sidecar` captions row naming it. `read(ref)` reads a file's bytes."""
    rows: dict[str, dict] = {}
    errors = []
    for ref in refs:
        model = import_model(ref, text_as)
        try:
            caption, tags, weights, raw = parse(ref, text_as, read)
        except SideError as e:
            errors.append({"table": "captions", "image_id": image_id, "model": model, "status": "error",
                           "error": "bad_sidecar", "message": f"{ref['location']}: {e}"})
            continue
        if "captions" in rows and raw is not None and clean_caption(raw) == rows["captions"]["caption"]:
            continue  # the caption already read, written again (img2dataset: .json and .txt)
        base = {"image_id": image_id, "model": model, "status": "ok", "message": ref["location"]}
        if caption and "captions" not in rows:
            rows["captions"] = {"table": "captions", **base, "caption": caption, "raw": raw}
        if tags and "tags" not in rows:
            rows["tags"] = {"table": "tags", **base, "tags": tags, "tag_scores": weights}
    return list(rows.values()) + errors


def import_model(ref: dict, text_as: str) -> str:
    """The `model` value of an import: `import:sidecar@ext=txt,as=auto`, `import:sidecar@ext=yaml`,
    `import:img2dataset@column=caption`, `import:hf@column=text`."""
    ext = ref["ext"]
    if ext == "img2dataset":
        return model_value("import", "img2dataset", {"column": "caption"})
    if ext == "hf":
        return model_value("import", "hf", {"column": ref["column"]})
    settings = {"ext": ext[1:]} | ({"as": text_as} if ext in (".txt", ".caption") else {})
    return model_value("import", "sidecar", settings)


def parse(ref: dict, text_as: str, read: Callable[[dict], bytes]) -> tuple[str | None, list | None, list | None,
                                                                         str | None]:
    """(caption, tags, tag weights, raw text) of one side file or value."""
    ext = ref["ext"]
    if ext == "hf":
        value = ref["value"]
        if ref["table"] == "tags":
            return None, split_tags(value) if isinstance(value, str) else clean_tags(value), None, None
        return clean_caption(str(value)), None, None, str(value)
    if ext == "img2dataset":
        caption = ref["record"].get("caption")
        return clean_caption(caption) if isinstance(caption, str) else None, None, None, json.dumps(ref["record"])
    text = _text(read(ref))
    if ext in (".txt", ".caption"):
        return (*read_text(text, text_as), None, text)
    if ext == ".json":
        obj = _loaded(json.loads, text, "JSON")
        caption, tags = obj.get("caption"), obj.get("tags")
        tags = split_tags(tags) if isinstance(tags, str) else clean_tags(tags) if isinstance(tags, list) else None
        return clean_caption(caption) if isinstance(caption, str) else None, tags, None, text
    import yaml

    obj = _loaded(yaml.safe_load, text, "YAML")
    return (*everydream_yaml(obj, text_as), text)


def _text(data: bytes) -> str:
    if len(data) > MAX_SIDE_BYTES:
        raise SideError(f"{len(data)} bytes is over the {MAX_SIDE_BYTES >> 20} MiB cap for a side file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SideError(f"not UTF-8 text (byte {e.start})") from None


def _loaded(load, text: str, kind: str) -> dict:
    try:
        obj = load(text)
    except Exception as e:  # yaml and json raise their own error types
        raise SideError(f"not valid {kind}: {str(e).splitlines()[0]}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise SideError(f"{kind} holds a {type(obj).__name__}, not a mapping")
    return obj


def everydream_yaml(obj: dict, text_as: str) -> tuple[str | None, list | None, list | None]:
    """EveryDream2's per-image YAML: `main_prompt` (or a `caption` read like a .txt) and
    `tags`, each a string or {tag, weight} (weight 1.0 when not given)."""
    main = obj.get("main_prompt")
    main = main[0] if isinstance(main, list) and main else main
    caption, tags = read_text(obj["caption"], text_as) if isinstance(obj.get("caption"), str) else (None, None)
    caption = clean_caption(main) if isinstance(main, str) else caption
    listed = obj.get("tags") or []
    pairs = []
    for item in (split_tags(listed) or []) if isinstance(listed, str) else listed:
        tag, weight = (item.get("tag"), item.get("weight")) if isinstance(item, dict) else (item, None)
        if isinstance(tag, (str, int, float)) and str(tag).strip():
            pairs.append((str(tag).strip(), float(weight) if isinstance(weight, (int, float)) else 1.0))
    if pairs:
        kept = dict(reversed(pairs))  # a repeated tag keeps its first weight
        tags = list(dict.fromkeys(t for t, _ in pairs))
        return caption, tags, [kept[t] for t in tags]
    return caption, tags, None


def read_text(text: str, text_as: str) -> tuple[str | None, list | None]:
    """(caption, tags) of a .txt/.caption file, read as `text_as` says (module docstring)."""
    if text_as == "caption":
        return clean_caption(text), None
    if text_as == "tags":
        return None, split_tags(text)
    if KEEP_TOKENS_SEPARATOR in text:
        fixed, _, rest = text.partition(KEEP_TOKENS_SEPARATOR)
        return clean_caption(fixed), split_tags(rest.replace(KEEP_TOKENS_SEPARATOR, ","))
    pieces = [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]
    if len(pieces) >= 3 and all(_taglike(p) for p in pieces[1:]):
        if _taglike(pieces[0]):
            return None, clean_tags(pieces)
        return clean_caption(pieces[0]), clean_tags(pieces[1:])
    return clean_caption(text), None


def _taglike(piece: str) -> bool:
    return len(piece.split()) <= 4 and not _SENTENCE_END.search(piece)


def clean_caption(text: str | None) -> str | None:
    return " ".join(text.split()) or None if text else None


def split_tags(text: str) -> list[str] | None:
    return clean_tags(re.split(r"[,\n]", text))


def clean_tags(tags) -> list[str] | None:
    """Tags as written (trimmed, `\\(` unescaped), empty and repeated ones dropped."""
    cleaned = (" ".join(str(t).replace("\\(", "(").replace("\\)", ")").split()) for t in tags if t is not None)
    return list(dict.fromkeys(t for t in cleaned if t)) or None


# ---- writing what is new (driver) --------------------------------------------------------
def _content(table: str, row: dict) -> str:
    return "\x1f".join(row.get("tags") or []) if table == "tags" else row.get("caption") or ""


def _key(image_id: str, message: str, model: str, content: str) -> int:
    joined = "\x1f".join([image_id, message or "", model, content])
    return int(hashlib.md5(joined.encode("utf-8", "surrogateescape")).hexdigest()[:16], 16)


# The same key in SQL, over the latest import row of each image, file and model value.
_STORED_SQL = """
SELECT substr(md5(concat_ws(chr(31), image_id, coalesce(message, ''), model, {content})), 1, 16) AS k
FROM "{table}" WHERE model LIKE 'import:%'
QUALIFY row_number() OVER (PARTITION BY image_id, message, model ORDER BY created_at DESC) = 1
"""
_CONTENT_SQL = {"captions": "coalesce(caption, '')", "tags": "coalesce(array_to_string(tags, chr(31)), '')"}


class SideImports:
    """What the tables hold from earlier imports, and the rows of a batch that are new."""

    TABLES = ("captions", "tags")

    def __init__(self, ds: Dataset):
        self.stored = {t: {int(k, 16) for k in ds.query(_STORED_SQL.format(table=t, content=_CONTENT_SQL[t]))
                           .column("k").to_pylist()} for t in self.TABLES}
        self.added: Counter = Counter()

    def tables(self, batches: list[list[dict]]) -> dict[str, pa.Table]:
        """The new rows of each table from the images' side rows (lists of dicts), in order."""
        new: dict[str, list[dict]] = {t: [] for t in self.TABLES}
        for rows in batches:
            for row in rows:
                table = row["table"]
                key = _key(row["image_id"], row["message"], row["model"], _content(table, row))
                if key not in self.stored[table]:
                    self.stored[table].add(key)
                    new[table].append(row)
        out = {}
        for table, rows in new.items():
            if rows:
                out[table] = _table(table, rows)
                ok = sum(r["status"] == "ok" for r in rows)
                self.added.update({f"{table} imported": ok, "side files unreadable": len(rows) - ok})
        self.added = +self.added  # no zero counts in the summary
        return out


def _table(name: str, rows: list[dict]) -> pa.Table:
    schema = SCHEMAS[name]
    created = now()
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    columns["created_at"] = [created] * len(rows)
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)
