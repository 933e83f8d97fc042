"""A pass's work in units that a run claims before doing them, so that two runs of one stage
on one dataset share the work instead of both doing it (curate/claims.py has the leases).

A unit is named the same in every run: a part of the source table (its rows never change),
or, for a source stage (ingest), a stretch of its input whose boundaries are chosen by the
rows' own keys (a key whose hash is 0 modulo CHUNK starts a new stretch), so an added file
moves at most one boundary. `plan` lists the units that hold something to do, in storage
order, each with the keys every stage has to do in it; a key belongs to the first unit that
holds it (a duplicate image's later rows are not its input).

Before a unit is read, `Work.claim` claims it for each stage that has keys in it, and drops
keys that another run finished since this one planned (`DoneKeys` follows the stage's table
as parts appear). A unit another run holds is left to it. Both engines call these: the local
one in its pass process, the Ray one in tasks (a `Work` pickles).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from curate.claims import ClaimError
from curate.pipelines.rows import binary_views
from curate.pipelines.stage import Stage
from curate.storage import LOCATOR_COLUMNS, holds_image
from curate.store import Dataset, part_name, row_groups_holding, write_error

CHUNK = 256  # a source stage's rows per unit, on average
MAX_CHUNK = 4 * CHUNK


@dataclass
class Unit:
    name: str  # the same in every run
    keys: list[set]  # per stage: the keys it has to do here (as planned)
    part: str | None = None  # the source part; None for a source stage's stretch of rows
    row_groups: list[int] | None = None  # the part's row groups that hold those keys
    rows: list[dict] | None = None  # a source stage's input rows


@dataclass
class Held:
    """Keys left to another run: a stage's keys in a unit it holds."""

    stage: int
    keys: int
    holder: str


class DoneKeys:
    """The keys of a table's rows that match a filter (a stage's done rows: its `model`'s),
    following the table as it grows: `new()` reads only the parts it has not read before."""

    def __init__(self, ds: Dataset, table: str, key: str, filter: pads.Expression):
        self.ds, self.table, self.key, self.filter = ds, table, key, filter
        self.seen: set[str] = set()

    @classmethod
    def of(cls, ds: Dataset, stage: Stage) -> DoneKeys:
        return cls(ds, stage.table, stage.key, stage.done_filter())

    def skip_present(self) -> None:
        """Leave the parts there now to the caller: new() reads only those that come after."""
        self.seen.update(part_name(part) for part in self.ds.parts(self.table))

    def new(self) -> set:
        """The keys in parts that appeared since the last call (the first call: all of them)."""
        keys: set = set()
        for part in self.ds.parts(self.table):
            if part_name(part) in self.seen:
                continue
            for batch in self.ds.scan_part(self.table, part, {"k": pc.field(self.key), "done": self.filter}):
                keys.update(k for k, d in zip(batch.column("k").to_pylist(), batch.column("done").to_pylist())
                            if d and k is not None)
            self.seen.add(part_name(part))
        return keys


@dataclass
class Work:
    """One run's view of a pass: its stages, their claims, and what it found done."""

    ds: Dataset
    stages: list[Stage]
    owner: str | None = None  # the run's id (curate.claims.Owner), once it has one

    def __post_init__(self):
        self.done = [DoneKeys.of(self.ds, s) for s in self.stages]
        self.done_since = [set() for _ in self.stages]  # done by other runs after this one planned

    def todo(self, where: str | None, wanted: list[str] | None) -> list[set]:
        """Per stage, the ok images (matching `where`, or of `wanted`) it has no row for yet:
        one DuckDB query each, so at 99% done only the ids left become Python strings. The
        parts listed before it are the ones it read: `done` follows only parts after them."""
        for done in self.done:
            done.skip_present()
        return [set(todo_ids(self.ds, s, where, wanted)) for s in self.stages]

    # ---- planning ------------------------------------------------------------------
    def plan(self, todo: list[set] | None) -> Iterator[Unit]:
        """The units with something to do, in storage order: of the source table's rows for
        each stage's `todo` keys, or (todo None) of a source stage's own input rows."""
        if todo is None:
            yield from self._plan_source()
            return
        remaining = [set(t) for t in todo]  # a key goes to the first unit that holds it
        wanted = set().union(*remaining)
        if not wanted:
            return
        source = self.stages[0].source
        projection = {"k": pc.field(self.stages[0].key), "use": plan_filter(self.stages)}
        # DuckDB finds the row groups that hold a key to do (issue 23's fast path: at 99% done a
        # resumed pass reads a few row groups' keys, not every part's); only those are read here.
        for part, groups in row_groups_holding(self.ds.parts(source), wanted):
            keys: list[set] = [set() for _ in self.stages]
            used = []
            for group in groups:
                holds = False
                for batch in self.ds.scan_part(source, part, projection, [group], batch_size=1 << 16):
                    for k, use in zip(batch.column("k").to_pylist(), batch.column("use").to_pylist()):
                        if use and any(k in r for r in remaining):
                            for s, r in enumerate(remaining):
                                if k in r:
                                    keys[s].add(k)
                                    r.discard(k)
                            holds = True
                if holds:
                    used.append(group)
            if used:
                yield Unit(part_name(part).removesuffix(".parquet"), keys, part=str(part), row_groups=used)

    def _plan_source(self) -> Iterator[Unit]:
        stage = self.stages[0]
        # The stage's inputs() marks what its table holds `present` (ingest: files ingested before,
        # but for their side files); `done` follows only the parts that come after it looked.
        # Stretches are cut from every input, present or not, so two runs that started at
        # different moments name the same stretch the same and claim it from each other.
        self.done[0].skip_present()
        seen: set = set()  # a row named twice in the input (a source given twice) counts once
        for stretch in _stretches(stage.inputs(self.ds), stage.key):
            rows = [r for r in stretch if not r.get("present") and r[stage.key] not in seen]
            seen.update(r[stage.key] for r in rows)
            if rows:
                name = hashlib.sha256(str(stretch[0][stage.key]).encode()).hexdigest()[:20]
                yield Unit(name, [{r[stage.key] for r in rows}], rows=rows)

    # ---- claiming and reading ------------------------------------------------------
    def claim(self, unit: Unit) -> tuple[list[set], list[Held]]:
        """Claim the unit for each stage with keys in it: (per stage, the keys this run does
        now; the stages another run holds it for)."""
        mine: list[set] = [set() for _ in self.stages]
        held = []
        for k, keys in enumerate(unit.keys):
            if not keys:
                continue
            claims = self.ds.claims(self.stages[k].table, self.stages[k].model_key(), self.owner)
            try:
                holder = claims.claim(unit.name)
            except ClaimError as e:
                raise write_error(e, "a claim on work", claims.folder) from None
            if holder is not None:
                held.append(Held(k, len(keys), holder))
            else:
                self.done_since[k] |= self.done[k].new()
                mine[k] = keys - self.done_since[k]
        return mine, held

    def read(self, unit: Unit, mine: list[set], batch_size: int) -> Iterator[pa.RecordBatch]:
        """The unit's source rows some stage does here, with `_todo`: the stages that do each
        (a source stage's rows are the unit's own; see `rows`)."""
        stages, key = self.stages, self.stages[0].key
        wanted = set().union(*mine)
        if not wanted:
            return
        # The filter is read as a column and applied only to batches it drops rows from:
        # Arrow's filter copies every image's bytes even when it keeps them all.
        projection = {c: pc.field(c) for c in input_columns(stages)} | {"_keep": input_filter(stages, wanted)}
        first = set()  # a key's first row only (an image's duplicates in the same part)
        for batch in self.ds.scan_part(stages[0].source, unit.part, projection, unit.row_groups, batch_size):
            batch = _kept(batch)
            keys = batch.column(key).to_pylist()
            keep = []
            for k in keys:  # one at a time: a key may come twice in one batch
                keep.append(k not in first)
                first.add(k)
            if not all(keep):
                batch, keys = batch.filter(pa.array(keep)), [k for k, f in zip(keys, keep) if f]
            todo = [[s for s, m in enumerate(mine) if k in m] for k in keys]
            yield batch.append_column("_todo", pa.array(todo, pa.list_(pa.int8())))

    def rows(self, unit: Unit, mine: list[set]) -> list[dict]:
        """A source stage's rows this run does in the unit."""
        return [r for r in unit.rows if r[self.stages[0].key] in mine[0]]


def _stretches(rows: Iterable[dict], key: str) -> Iterator[list[dict]]:
    """Rows in stretches that end where a key's hash says so (or at MAX_CHUNK rows)."""
    stretch: list[dict] = []
    for row in rows:
        starts = int.from_bytes(hashlib.sha256(str(row[key]).encode()).digest()[:4], "big") % CHUNK == 0
        if stretch and (starts or len(stretch) >= MAX_CHUNK):
            yield stretch
            stretch = []
        stretch.append(row)
    if stretch:
        yield stretch


def todo_ids(ds: Dataset, stage: Stage, where: str | None = None, wanted: list[str] | None = None) -> list[str]:
    """Ok images (matching `where`, or of `wanted`) that have no row for this stage's model yet."""
    if wanted is None:  # one query: at 99% done only the ids left become Python strings
        return ds.select_ids(where, undone=(stage.table, stage.model_key()))
    done = ds.read(stage.table, ["image_id"], filter=pc.field("model") == stage.model_key())
    done_ids = set(done.column("image_id").to_pylist())
    return [i for i in wanted if i not in done_ids]


def source_of(ds: Dataset, stage: Stage, key: str) -> str:
    """The file a key names, for people: a source stage's key is its source; an image's, its
    first source."""
    if stage.source is None:
        return key
    found = ds.read("images", ["source"], filter=pc.field("image_id") == key).column("source").to_pylist()
    return min(found) if found else f"image {key}"


def plan_filter(stages: list[Stage]) -> pads.Expression:
    """Source rows that can be a pass's input (which ones are is the plan's to say)."""
    stage = stages[0]
    expr = stage.source_filter()
    return expr & (pc.field("status") == "ok") if stage.source == "images" else expr


def input_filter(stages: list[Stage], ids) -> pads.Expression:
    """Rows of the pass's source table to feed (all stages of one pass share the first one's)."""
    expr = pc.field("image_id").isin(pa.array(list(ids), pa.string())) & plan_filter(stages)
    if stages[0].source == "images" and any("bytes" in s.columns for s in stages):
        expr = expr & holds_image()  # the one row of an image that holds its bytes (or locator)
    return expr


def input_columns(stages: list[Stage]) -> list[str]:
    """The source columns a pass reads: every stage's, and what input_filter needs."""
    columns = set().union(*(s.columns for s in stages))
    if stages[0].source == "images":
        columns |= {"image_id", "status"}
        if "bytes" in columns:  # a referenced image's bytes are read where its locator points
            columns |= {*LOCATOR_COLUMNS, "size_bytes"}
    return sorted(columns)


def _kept(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch's rows whose `_keep` is true, without the column; not copied when all are."""
    keep = batch.column("_keep")
    batch = batch.drop_columns(["_keep"])
    return batch if keep.null_count == 0 and pc.all(keep).as_py() is not False else batch.filter(keep)


def as_rows(batch: pa.RecordBatch | pa.Table) -> list[dict]:
    """Rows as dicts; image bytes as views of Arrow's memory that the decoder reads in
    place. (to_pylist, and even Arrow's scalars, copy each image: about 1 ms for 2 MB.)"""
    if "bytes" not in batch.column_names:
        return batch.to_pylist()
    rows = batch.drop_columns(["bytes"]).to_pylist()
    for row, blob in zip(rows, binary_views(batch.column("bytes"))):
        row["bytes"] = blob
    return rows


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of n items (the last one shorter)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch
