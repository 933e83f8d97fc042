"""`curate dups` and `curate info`: what is in a dataset, and what is in it twice.

Exact duplicates are sources whose bytes hash to the same image_id. Near duplicates are
different images whose perceptual hashes (from `curate hash`) differ in at most
`threshold` bits. Pairs are found without comparing every image with every other: split
the 64 bits into threshold+1 bands; two hashes within the threshold agree exactly on at
least one band (pigeonhole), so only images sharing a band value are compared. Pairs are
then joined into groups (connected components).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from curate.schema import TABLES
from curate.store import Dataset, Rows

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_THRESHOLD = 6  # of 64 bits: re-encodes and small resizes land within it; unrelated images ~32 apart
MAX_THRESHOLD = 16  # beyond this, bands are so narrow that almost everything is compared


def duplicate_groups(ds: Dataset, threshold: int = DEFAULT_THRESHOLD) -> pa.Table:
    """One row per member: group number, 'exact' or 'near', image_id, source, and the
    Hamming distance to the group's first image (0 for exact duplicates)."""
    import pyarrow as pa

    if not 0 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"--threshold must be between 0 and {MAX_THRESHOLD} bits (got {threshold})")
    rows = []
    exact = ds.query(
        "SELECT image_id, source FROM images WHERE status = 'ok' AND image_id IN "
        "(SELECT image_id FROM images WHERE status = 'ok' GROUP BY image_id HAVING count(*) > 1) "
        "ORDER BY image_id, source").to_pylist()
    group, last = 0, None
    for r in exact:
        if r["image_id"] != last:
            group, last = group + 1, r["image_id"]
        rows.append({"group": group, "kind": "exact", **r, "distance": 0})
    for members in near_groups(ds, threshold):
        group += 1
        first = members[0]["phash"]
        for m in members:
            rows.append({"group": group, "kind": "near", "image_id": m["image_id"], "source": m["source"],
                         "distance": (m["phash"] ^ first).bit_count()})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("group", pa.int32()), ("kind", pa.string()), ("image_id", pa.string()), ("source", pa.string()),
        ("distance", pa.int32())]))


def near_groups(ds: Dataset, threshold: int) -> list[list[dict]]:
    bands = _bands(threshold)
    band_values = " UNION ALL ".join(
        f"SELECT image_id, phash, {b} AS band, (phash >> {lo}) & {(1 << (hi - lo)) - 1} AS value FROM hashes"
        for b, (lo, hi) in enumerate(bands))
    pairs = ds.query(
        "WITH hashes AS (SELECT image_id, phash FROM manifest WHERE phash IS NOT NULL), "
        f"banded AS ({band_values}), "
        # the distance is checked as each band's pairs are joined, so only near pairs are ever
        # kept (keeping every candidate first took ~10 GB at 100,000 images of random hashes)
        "SELECT DISTINCT x.image_id AS a, y.image_id AS b FROM banded x JOIN banded y "
        "ON x.band = y.band AND x.value = y.value AND x.image_id < y.image_id "
        f"WHERE bit_count(xor(x.phash, y.phash)) <= {threshold}").to_pylist()
    if not pairs:
        return []
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = root(p["a"]), root(p["b"])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ids = sorted(parent)
    info = {r["image_id"]: r for r in ds.query(
        "SELECT image_id, source, phash FROM manifest WHERE image_id IN ("
        + ", ".join(f"'{i}'" for i in ids) + ")").to_pylist()}  # ids are sha256 hex: safe to inline
    groups: dict[str, list[dict]] = {}
    for i in ids:
        groups.setdefault(root(i), []).append(info[i])
    return sorted(groups.values(), key=lambda g: g[0]["image_id"])


def _bands(threshold: int) -> list[tuple[int, int]]:
    """threshold+1 bit ranges [lo, hi) covering the 64 bits as evenly as possible."""
    n = threshold + 1
    edges = [round(64 * k / n) for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def has_stats(ds: Dataset) -> bool:
    return bool(ds.parts("stats"))


def dataset_info(ds: Dataset) -> tuple[Rows, dict]:
    """One row per table and model (rows, ok rows, errors by code, parts on disk), and the
    headline numbers of the images. One scan of each table (each scan opens every part: tens
    of thousands at 1.5M images), all on one DuckDB instance (each takes tens of ms to start)."""
    out = []
    con = ds.connect(set(TABLES))
    try:
        for name, columns in TABLES.items():
            parts = ds.parts(name)
            if not parts:
                continue
            size = round(ds.part_bytes(name) / 2**20, 2)
            names = [c.name for c in columns]
            if "status" not in names:
                n = con.sql(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
                out.append((name, None, n, None, "", len(parts), size))
                continue
            model = "model" if "model" in names else "NULL"
            for row in con.sql(
                    "SELECT model, sum(n) AS rows, coalesce(sum(n) FILTER (WHERE status = 'ok'), 0) AS ok, coalesce("
                    "string_agg(error || ': ' || n, ', ' ORDER BY n DESC, error) FILTER (WHERE status <> 'ok'), '') "
                    f"FROM (SELECT {model} AS model, status, error, count(*) AS n FROM \"{name}\" GROUP BY ALL) "
                    "GROUP BY model ORDER BY model").fetchall():
                out.append((name, *row, len(parts), size))
        headline = con.sql(
            "SELECT count(DISTINCT image_id) FILTER (WHERE status = 'ok') AS images, count(*) AS sources, "
            "count(*) FILTER (WHERE status = 'ok') - count(DISTINCT image_id) FILTER (WHERE status = 'ok') "
            "AS exact_duplicates, count(*) FILTER (WHERE status <> 'ok') AS errors FROM images")
        summary = dict(zip(headline.columns, headline.fetchall()[0]))
    finally:
        con.close()
    return Rows(["table", "model", "rows", "ok", "errors", "parts", "mb"], out), summary
