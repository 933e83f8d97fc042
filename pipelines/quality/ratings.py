"""The ratings table and the embeddings the quality head learns from.

Every judgement from the rating page is written as its own part, so it is durable (the
part is fsynced and renamed into place) before the page shows the next pair, and undo
is exact: it removes the part it wrote. CSV import writes one part for the whole file,
after every row has been checked, so a bad file writes nothing; rows the table already
holds are not added again, so importing a file twice counts its judgements once.
"""
from __future__ import annotations

import csv
import getpass
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.store import Dataset, DatasetError, now

WINNERS = ("left", "right", "tie")
WINNER_TARGET = {"left": 1.0, "right": 0.0, "tie": 0.5}  # P(left wins) each judgement says
CSV_COLUMNS = ("left", "right", "winner")
RATING_KEY = ("left", "right", "winner", "rater")  # what makes two judgements the same one
IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")


def default_rater() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


def record(ds: Dataset, left: str, right: str, winner: str, rater: str | None = None) -> Path:
    """Write one judgement as its own part; returns the part (undo removes it)."""
    if winner not in WINNERS:
        raise ValueError(f"winner {winner!r} must be one of {', '.join(WINNERS)}")
    return ds.write_part("ratings", {"left": [left], "right": [right], "winner": [winner],
                                     "rater": [rater or default_rater()], "created_at": [now()]})


def undo(part: Path) -> None:
    part.unlink(missing_ok=True)


def load_ratings(ds: Dataset) -> pa.Table:
    return ds.read("ratings")


# ---- CSV ---------------------------------------------------------------------------
def import_csv(ds: Dataset, path: str | Path, rater: str | None = None) -> dict:
    """Check every row of a left,right,winner CSV (ids or source paths), then write them as one part."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    by_source, ok_ids = _id_lookup(ds)
    rows, problems = {"left": [], "right": [], "winner": [], "rater": []}, []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the header must have "
                             f"left,right,winner (found {','.join(reader.fieldnames or []) or 'nothing'})")
        for line, row in enumerate(reader, start=2):
            sides = [_resolve(row[side] or "", path.parent, by_source, ok_ids) for side in ("left", "right")]
            winner = (row["winner"] or "").strip().lower()
            for side, value, image_id in zip(("left", "right"), (row["left"], row["right"]), sides):
                if image_id is None:
                    problems.append(f"line {line}: {side} {value!r} is neither an ok image id "
                                    "nor the source path of one")
            if winner not in WINNERS:
                problems.append(f"line {line}: winner {row['winner']!r} must be left, right or tie")
            elif sides[0] is not None and sides[0] == sides[1]:
                problems.append(f"line {line}: left and right are the same image")
            if None not in sides and winner in WINNERS:
                rows["left"].append(sides[0])
                rows["right"].append(sides[1])
                rows["winner"].append(winner)
                rows["rater"].append(row.get("rater") or rater or f"import:{path.name}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{path}: nothing imported; " + "; ".join(problems[:5]) + more)
    if not rows["left"]:
        raise ValueError(f"{path}: no rows under the header")
    rows, present = _not_yet_stored(ds, rows)
    if rows["left"]:
        rows["created_at"] = [now()] * len(rows["left"])
        ds.write_part("ratings", rows)
    return {"imported": len(rows["left"]), "already_there": present, **{w: rows["winner"].count(w) for w in WINNERS}}


def _not_yet_stored(ds: Dataset, rows: dict[str, list]) -> tuple[dict[str, list], int]:
    """The rows the ratings table does not hold yet, and how many it does: importing a file
    again (or an export of this dataset) adds nothing, a file with rows appended adds those.
    Counted per (left, right, winner, rater), so a pair judged twice is kept twice."""
    stored = Counter(zip(*(load_ratings(ds).column(c).to_pylist() for c in RATING_KEY)))
    keep = []
    for key in zip(*(rows[c] for c in RATING_KEY)):
        keep.append(stored[key] == 0)
        if stored[key]:
            stored[key] -= 1  # this stored judgement is matched; a second identical row is new
    return {c: [v for v, k in zip(values, keep) if k] for c, values in rows.items()}, keep.count(False)


def export_csv(ds: Dataset, path: str | Path) -> int:
    table = load_ratings(ds).sort_by("created_at")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, "rater", "created_at"])
        for row in table.to_pylist():
            writer.writerow([row["left"], row["right"], row["winner"], row["rater"] or "",
                             row["created_at"].isoformat()])
    return table.num_rows


def _id_lookup(ds: Dataset) -> tuple[dict[str, str], set[str]]:
    images = ds.read("images", ["image_id", "source"], filter=pc.field("status") == "ok")
    ids, sources = images.column("image_id").to_pylist(), images.column("source").to_pylist()
    return dict(zip(sources, ids)), set(ids)


def _resolve(value: str, base: Path, by_source: dict[str, str], ok_ids: set[str]) -> str | None:
    """An image id, an exact source, or a path (relative to the CSV's folder) of an ok image."""
    value = value.strip()
    if IMAGE_ID.match(value.lower()):
        return value.lower() if value.lower() in ok_ids else None
    if value in by_source:
        return by_source[value]
    if value:
        return by_source.get(str((base / Path(value).expanduser()).resolve()))
    return None


# ---- embeddings --------------------------------------------------------------------
def embedders(ds: Dataset) -> list[str]:
    table = ds.read("embeddings", ["model"], filter=pc.field("status") == "ok")
    return sorted(set(table.column("model").to_pylist()))


def choose_embedder(ds: Dataset, embedder: str | None) -> str:
    known = embedders(ds)
    if not known:
        raise DatasetError("the dataset has no CLIP embeddings yet; run `curate score DS --clip MODEL` first")
    if embedder is None:
        if len(known) > 1:
            raise DatasetError("the dataset has embeddings from several models; choose one with --embedder: "
                               f"{', '.join(known)}")
        return known[0]
    if embedder not in known:
        raise DatasetError(f"no embeddings from {embedder!r}; the dataset has: {', '.join(known)}")
    return embedder


def load_embeddings(ds: Dataset, embedder: str, ids: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """The latest ok embedding of each image (only `ids` when given), as float32 rows."""
    con = ds.connect()
    try:
        table = con.sql(
            "SELECT image_id, embedding FROM embeddings WHERE status = 'ok' AND model = ? "
            "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY created_at DESC) = 1 ORDER BY image_id",
            params=[embedder]).to_arrow_table()
    finally:
        con.close()
    found = table.column("image_id").to_pylist()
    if not found:
        return [], np.zeros((0, 0), np.float32)
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(found), -1)
    if ids is not None:
        index = {image_id: k for k, image_id in enumerate(found)}
        keep = [k for k in (index.get(i) for i in ids) if k is not None]
        found, vectors = [found[k] for k in keep], vectors[keep]
    return found, vectors
