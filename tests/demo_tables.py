"""The demo dataset's tables as plain rows, read with DuckDB: what a refactor must not change.

Timestamps are dropped; paths are made relative to the demo's folder; image bytes and latent
bytes are replaced by their sha256 (the fixture stays small and still pins every bit).
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

BLOBS = {"bytes", "latent", "mean", "logvar", "flip_latent", "flip_mean", "flip_logvar"}


def demo_tables(demo_root: Path) -> dict[str, pa.Table]:
    root = str(Path(demo_root).resolve())
    con = duckdb.connect()
    out = {}
    for folder in sorted((Path(root) / "dataset" / "tables").iterdir()):
        files = f"'{folder}/part-*.parquet'"
        columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({files})").fetchall()]
        select = []
        for c in columns:
            if c == "created_at":
                continue
            if c in BLOBS:
                select.append(f'sha256("{c}") AS "{c}"')
            elif c in ("source", "message", "vae", "model"):
                select.append(f"replace(\"{c}\", '{root}/', '') AS \"{c}\"")
            else:
                select.append(f'"{c}"')
        out[folder.name] = con.sql(f"SELECT {', '.join(select)} FROM read_parquet({files}) "
                                   "ORDER BY ALL").to_arrow_table()
    return out
