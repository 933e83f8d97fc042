"""What `curate view` shows and changes: a grid over any filter, everything known about one
image, and hand edits.

The stage results are joined once per set of parts and kept in the dataset's cache folder
(Dataset.stage_manifest; DS/cache, or a local folder for a dataset in object storage),
and the edits are applied over that by the same SQL as the dataset's own `manifest` view
(curate.store.edited_manifest_sql): a grid costs one filtered, sorted query over one
Parquet file, and an edit only refreshes the edits table's view.
Filters are parsed as one SQL expression (duckdb.SQLExpression) and applied through the
relation API, so text from the page never becomes a statement; sort keys must be columns.
"""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager

import duckdb

from curate import edits
from curate.buckets import Crop
from curate.pipelines.dups import DEFAULT_THRESHOLD
from curate.store import Dataset, edited_manifest_sql, guarded_connection
from curate.trainer.prompts import PromptBuilder, PromptConfig
from curate.web import IMAGE_ID

GRID_COLUMNS = "image_id, width, height, rank, has_watermark, excluded"
MAX_PAGE = 500
EDIT_ID = re.compile(r"[0-9a-f]{32}")
COMMON = "model, status, error, message, CAST(created_at AS VARCHAR) AS created_at"
# Per stage table, what the panel shows of its rows (never the image bytes, embeddings or latents).
DETAILS = {
    "images": "source, size_bytes, format, mode, status, error, message",
    "tags": f"{COMMON}, tags, tag_scores, rating, rating_score",
    "captions": f"{COMMON}, caption, prompt",
    "quality": f"{COMMON}, rank, probs",
    "watermarks": f"{COMMON}, score, has_watermark, boxes",
    "classifications": f"{COMMON}, classifier, label, score, labels, scores",
    "buckets": f"{COMMON}, bucket_width, bucket_height",
    "latents": f"{COMMON}, vae, original_height, original_width, resized_height, resized_width, crop_top, crop_left, "
               "target_height, target_width",
    "stats": f"{COMMON}, printf('%016x', phash) AS phash, brightness, sharpness, colorfulness, entropy",
    "embeddings": COMMON,
}
EXAMPLE_PROMPTS = 4


class ViewData:
    def __init__(self, ds: Dataset, prompts: PromptConfig | None = None, seed: int = 0):
        self.ds = ds
        self.prompts = PromptBuilder(prompts or PromptConfig(), seed=seed)
        self.lock = threading.Lock()  # one connection, one query at a time
        self.made = 0  # edits and undos through this page
        # The page's filter is a user's expression: it reads the dataset and nothing else.
        self.con = guarded_connection(directories=[ds.tables_dir, ds.cache_dir], remote=ds.remote)
        self.con.execute(ds.table_view_sql("edits"))
        self.base = ds.stage_manifest(self.con)
        manifest_views(self.con, self.base)
        self.columns = {name: kind for name, kind, *_ in self.con.execute("DESCRIBE manifest_all").fetchall()}
        self.details_ready = False  # the panel's views of every table, made when first needed

    # ---- reading -------------------------------------------------------------------
    @contextmanager
    def reading(self):
        """The connection's lock, with the cached join in place: another `curate view` or `curate
        report` that saw new parts replaced it, so join again (picking up the new results)."""
        with self.lock:
            if not cache_exists(self.base):
                self.base = self.ds.stage_manifest(self.con)
                manifest_views(self.con, self.base)
            yield

    def selection(self, where: str | None) -> duckdb.DuckDBPyRelation:
        """manifest_all filtered by one SQL expression (the --where rules), or ValueError."""
        relation = self.con.table("manifest_all")
        if where and where.strip():
            try:
                relation = relation.filter(duckdb.SQLExpression(where))
            except duckdb.Error as e:
                raise ValueError(f"bad filter: {str(e).splitlines()[0]}") from None
        return relation

    def count(self, where: str | None) -> int:
        with self.reading():
            return self._fetch(self.selection(where).aggregate("count(*)"))[0][0]

    def grid(self, where: str | None, order: str = "image_id", descending: bool = False, offset: int = 0,
             limit: int = 120) -> dict:
        if order not in self.columns:
            raise ValueError(f"cannot sort by {order!r}: not a manifest column")
        if not (0 <= offset and 1 <= limit <= MAX_PAGE):
            raise ValueError(f"offset >= 0 and 1 <= limit <= {MAX_PAGE}")
        direction = "DESC" if descending else "ASC"
        with self.reading():
            chosen = self.selection(where)
            total = self._fetch(chosen.aggregate("count(*)"))[0][0]
            page = (chosen.order(f'"{order}" {direction} NULLS LAST, image_id').limit(limit, offset)
                    .project(f'{GRID_COLUMNS}, CAST("{order}" AS VARCHAR) AS sort_value'))
            rows = self._records(page)
        return {"total": total, "offset": offset, "rows": rows}

    def ids(self, where: str | None) -> list[str]:
        with self.reading():
            return [r[0] for r in self._fetch(self.selection(where).project("image_id"))]

    def known(self, image_ids: list[str]) -> list[str]:
        """The ids, checked: each an image of this dataset (excluded ones too), else LookupError."""
        if not all(isinstance(i, str) and IMAGE_ID.fullmatch(i) for i in image_ids):
            raise LookupError("not an image id")
        with self.reading():
            found = {r[0] for r in self.con.execute(
                "SELECT image_id FROM stage_manifest WHERE list_contains(?, image_id)", [image_ids]).fetchall()}
        if len(found) < len(set(image_ids)):
            raise LookupError(f"{len(set(image_ids)) - len(found)} of the ids are not images of this dataset")
        return image_ids

    def panel(self, image_id: str) -> dict:
        """Everything known about one image: its manifest row, every row of every table (with
        errors), the crop the encoder took, exact and near duplicates, edits, example prompts."""
        self.known([image_id])
        with self.reading():
            if not self.details_ready:
                for name in DETAILS:
                    self.con.execute(self.ds.table_view_sql(name))
                self.details_ready = True
            row = self._records(self.con.table("manifest_all").filter(duckdb.ColumnExpression("image_id")
                                                                      == duckdb.ConstantExpression(image_id)))[0]
            tables = {name: self._records(self.con.sql(f'SELECT {columns} FROM "{name}" WHERE image_id = $id '
                                                       "ORDER BY created_at DESC", params={"id": image_id}))
                      for name, columns in DETAILS.items()}
            near = self._records(self.con.sql(
                "SELECT image_id, source, bit_count(xor(phash, p)) AS distance FROM stage_manifest, "
                "(SELECT phash AS p FROM stage_manifest WHERE image_id = $id) "
                f"WHERE image_id <> $id AND bit_count(xor(phash, p)) <= {DEFAULT_THRESHOLD} "
                "ORDER BY distance, image_id LIMIT 24", params={"id": image_id}))
            history = self._records(self.con.sql(
                "SELECT e.edit, e.action, e.value, e.editor, CAST(e.created_at AS VARCHAR) AS created_at, "
                "EXISTS (SELECT 1 FROM edits u WHERE u.action = 'undo' AND u.value = e.edit) AS undone "
                "FROM edits e WHERE e.image_id = $id ORDER BY e.created_at DESC", params={"id": image_id}))
        if row.get("phash") is not None:
            row["phash"] = f"{row['phash']:016x}"
        errors = [{"table": name, **{k: r.get(k) for k in ("model", "error", "message")}}
                  for name, rows in tables.items() for r in rows if r["status"] != "ok"]
        return {"image_id": image_id, "manifest": row, "tables": tables, "errors": errors,
                "crop": crop_box(tables["latents"]), "near_duplicates": near, "edits": history,
                "prompts": [self.prompts.build(image_id, epoch, row["tags"], row["caption"], row["rank"],
                                               bool(row["has_watermark"])).text for epoch in range(EXAMPLE_PROMPTS)]}

    # ---- editing -------------------------------------------------------------------
    def edit(self, action: str, value: str | None, image_ids: list[str] | None, where: str | None) -> dict:
        """One edit over the given ids, or over every image of the filter; written before it returns."""
        ids = self.known(image_ids) if image_ids is not None else self.ids(where)
        with self.lock:
            edit = edits.record(self.ds, action, ids, value)
            self.con.execute(self.ds.table_view_sql("edits"))
            self.made += 1
        return {"edit": edit, "images": len(ids)}

    def undo(self, edit: str) -> dict:
        if not (isinstance(edit, str) and EDIT_ID.fullmatch(edit)):
            raise LookupError("not an edit id")
        with self.lock:
            found = self.con.execute("SELECT count(*) FROM edits WHERE edit = ? AND action <> 'undo'",
                                     [edit]).fetchone()[0]
            if not found:
                raise LookupError("no such edit")
            edits.undo(self.ds, edit)
            self.con.execute(self.ds.table_view_sql("edits"))
            self.made += 1
        return {"undone": edit, "images": found}

    def history(self, limit: int = 20) -> list[dict]:
        return edits.history(self.ds, limit)

    # ---- helpers -------------------------------------------------------------------
    def _fetch(self, relation: duckdb.DuckDBPyRelation) -> list[tuple]:
        try:
            return relation.fetchall()
        except duckdb.Error as e:
            raise ValueError(f"bad filter: {str(e).splitlines()[0]}") from None

    def _records(self, relation: duckdb.DuckDBPyRelation) -> list[dict]:
        try:
            return relation.to_arrow_table().to_pylist()
        except duckdb.Error as e:
            raise ValueError(f"bad filter: {str(e).splitlines()[0]}") from None


def manifest_views(con: duckdb.DuckDBPyConnection, base: str) -> None:
    """`stage_manifest`, and `manifest_all` and `manifest` over it with the edits applied, as the dataset's own."""
    con.execute(f"CREATE OR REPLACE VIEW stage_manifest AS SELECT * FROM {base}")
    con.execute(f"CREATE OR REPLACE VIEW manifest_all AS {edited_manifest_sql('stage_manifest')}")
    con.execute("CREATE OR REPLACE VIEW manifest AS SELECT * EXCLUDE (excluded) FROM manifest_all WHERE NOT excluded")


def cache_exists(base: str) -> bool:
    """Whether a relation from stage_manifest still has its file (an in-memory join always has)."""
    match = re.fullmatch(r"read_parquet\('(.*)'\)", base, re.S)
    return match is None or os.path.exists(match.group(1).replace("''", "'"))


def quoted(path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def crop_box(latent_rows: list[dict]) -> dict | None:
    """The latest ok latent's crop as fractions of the original image (what the encoder kept)."""
    ok = [r for r in latent_rows if r["status"] == "ok"]
    if not ok:
        return None
    r = ok[0]
    crop = Crop(r["resized_width"], r["resized_height"], r["crop_left"], r["crop_top"], r["target_width"],
                r["target_height"])
    left, top, right, bottom = crop.source_box(r["original_width"], r["original_height"])
    w, h = r["original_width"], r["original_height"]
    return {"x0": left / w, "y0": top / h, "x1": right / w, "y1": bottom / h,
            "bucket": f"{r['target_width']}x{r['target_height']}"}
