"""The Ray engine of the executor: Ray Data tasks prepare rows on every core, model actors
process them.

`run_ray` yields the same [(stage index, rows)] lists as the local engine, from the same
`prepare_row` and `process_pass`, so both engines write the same rows. The driver claims
the pass's units of work when it starts (pipelines/work.py: a second run finds them held
and says by whom); Ray tasks read the units' rows (source parts, or a source stage's rows:
ingest's files and tar members named on the driver). `init_ray` joins a cluster
(`--ray-address`, RAY_ADDRESS) or starts a local one, and keeps Ray quiet.

A worker that dies (a decoder crash, the OOM killer, a lost node; a model actor too) loses
only its block: the pass goes on at full speed without it, the actors keep their models.
Then the keys it held go through again one row per block and batch, twice if need be: a
row lost both times is the one that kills its worker and becomes a `worker_died` row.
"""
from __future__ import annotations

import logging
import os
import pickle
import warnings

import pyarrow as pa

from curate.pipelines.rows import prepare_row, process_pass, setup_stages
from curate.pipelines.stage import Stage
from curate.pipelines.work import Unit, Work, source_of
from curate.storage import storage_env

# Ray Data retries a task whose worker died forever by default: an image that crashes the
# decoder would hang the command. Here a block whose worker dies is let go to the rounds after
# the pass, which try each of its rows alone, twice (a row lost both times is a poison).
ROUNDS = 3


def init_ray(ray_address: str | None = None):
    """Join the cluster at ray_address / RAY_ADDRESS, or start a local one; quietly."""
    import ray

    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        # Ray's INFO lines and its token-auth notice are for cluster operators; our own
        # progress bar and summary say what users need. Errors still come through.
        kwargs = dict(log_to_driver=False, logging_level=logging.ERROR)
        # Workers on every node reach the dataset's object storage as this process does (--endpoint-url
        # and keys live in the environment); a worker's own machine may have no such settings.
        if storage_env():
            kwargs["runtime_env"] = {"env_vars": storage_env()}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)
    import ray.data

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


def _read_units(batch: pa.Table, work: Work) -> pa.Table:
    """Ray task: the rows of claimed units (pickled (unit, keys) items) that the pass does."""
    tables = []
    for unit, mine in (pickle.loads(b) for b in batch.column("_unit").to_pylist()):
        if unit.rows is not None:  # a source stage's rows: pickled, as paths may not be UTF-8
            rows = work.rows(unit, mine)
            tables.append(pa.table({"_row": pa.array([pickle.dumps(r) for r in rows], pa.binary())}))
        else:
            tables += [pa.Table.from_batches([b]) for b in work.read(unit, mine, 1 << 16)]
    return pa.concat_tables(tables) if tables else pa.table({})


def _prepare_batch(batch: pa.Table, stages: list[Stage]) -> pa.Table:
    """Ray task: decode and prepare rows; results travel pickled (any shape)."""
    if "_row" in batch.column_names:  # a source stage's rows, pickled by the driver
        rows = [pickle.loads(b) for b in batch.column("_row").to_pylist()]
    else:
        rows = batch.to_pylist()
    key = stages[0].key
    keys = [r[key] for r in rows]
    prepared = [pickle.dumps(prepare_row(stages, r), protocol=5) for r in rows]
    return pa.table({"_key": pa.array(keys, pa.string()), "_prepared": pa.array(prepared, pa.binary())})


def _process_batch(stages: list[Stage], batch: pa.Table) -> pa.Table:
    """Process a batch of prepared rows; several tables come back in one Arrow batch as
    (stage index, IPC bytes) rows."""
    prepared = [pickle.loads(b) for b in batch.column("_prepared").to_pylist()]
    results = process_pass(stages, batch.column("_key").to_pylist(), prepared)
    return pa.table({"_stage": pa.array([k for k, _ in results], pa.int32()),
                     "_rows": pa.array([_to_ipc(t) for _, t in results], pa.binary())})


class _ProcessBatch:
    """Ray actor: loads the models once, then processes batches."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        setup_stages(stages)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _process_batch(self.stages, batch)


def _prepare_and_process(batch: pa.Table, stages: list[Stage]) -> pa.Table:
    """Ray task for a pass without a model (ingest, hash, buckets): both steps in one task,
    with no actor to hand rows to."""
    return _process_batch(stages, _prepare_batch(batch, stages))


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def run_ray(work: Work, todo: list[set] | None, ray_address: str | None, tally):
    ray = init_ray(ray_address)
    stages = work.stages
    claimed = []
    for unit in work.plan(todo):
        mine, held = work.claim(unit)
        for h in held:
            tally.held(h.stage, h.keys, h.holder)
        if any(mine):
            claimed.append((unit, mine))
    for round_ in range(ROUNDS):
        expected = [set().union(*(mine[k] for _, mine in claimed)) for k in range(len(stages))]
        returned: list[set] = [set() for _ in stages]
        for results in _pass(ray, work, claimed, alone=round_ > 0):
            for k, table in results:
                returned[k].update(table.column(stages[k].key).to_pylist())
            yield results
        missing = [e - r for e, r in zip(expected, returned)]  # a dead worker's block
        if not any(missing):
            return
        claimed = [(unit, [m & keys for m, keys in zip(missing, mine)]) for unit, mine in claimed]
        claimed = [(unit, mine) for unit, mine in claimed if any(mine)]
    yield from _worker_died(work, missing, tally)  # lost alone, round after round


def _worker_died(work: Work, missing: list[set], tally):
    """worker_died rows for keys whose worker died every time they went through."""
    for k, keys in enumerate(missing):
        if not keys:
            continue
        stage = work.stages[k]
        sources = {key: source_of(work.ds, stage, key) for key in sorted(keys)}
        for source in sources.values():
            tally.poison(source, "the Ray worker preparing it died every time")
        yield [(k, stage.rows(list(sources), {
            "_error": ["worker_died"] * len(sources),
            "_message": [f"the Ray worker holding this image died every time (source: {s})" for s in sources.values()],
        }))]


def _pass(ray, work: Work, claimed: list[tuple[Unit, list[set]]], alone: bool):
    """One Ray Data pass over the claimed units, in blocks and batches of the stages' batch
    size, or (alone) one row per block, batch and actor task; a block whose worker died is
    left out (no retry), and the pass goes on."""
    stages = work.stages
    if not claimed:
        return
    batch_size = 1 if alone else min(s.batch_size for s in stages)
    gpus = ray.cluster_resources().get("GPU", 0)
    num_gpus = max(s.resources.gpus for s in stages)
    actors = max(1, int(gpus // num_gpus)) if num_gpus and gpus else 1
    context = ray.data.DataContext.get_current()  # a Dataset keeps the settings it was made with
    saved = context.execution_options.preserve_order, context.max_errored_blocks
    # An ordered stage (ingest: the first copy of a file keeps its bytes) sees rows in input order.
    context.execution_options.preserve_order = any(s.ordered for s in stages)
    context.max_errored_blocks = -1  # a lost block goes to the next round instead of ending the pass
    quiet = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a lost block's traceback: the next round deals with it
    try:
        units = [{"_unit": pickle.dumps(item)} for item in claimed]
        data = ray.data.from_items(units, override_num_blocks=len(units))
        # Decoding runs as CPU tasks on every core; the models as a pool of actors that load
        # weights once. The actors ask for no CPU: with equal resource requests Ray Data
        # fuses the two steps into the actor, and all decoding would then run in the one
        # model actor, on one core. A model's own CPU work shares the cores.
        with warnings.catch_warnings():  # these remote args have no named parameter in map_batches yet
            warnings.simplefilter("ignore", DeprecationWarning)
            data = data.map_batches(_read_units, fn_kwargs={"work": work}, batch_format="pyarrow", batch_size=1,
                                    max_retries=0)
            # A part holds thousands of rows and Ray makes one task per block: cut blocks to one
            # batch so decoding spreads over every core.
            data = data.repartition(target_num_rows_per_block=batch_size)
            with_model = any(s.has_model for s in stages)
            data = data.map_batches(_prepare_batch if with_model else _prepare_and_process,
                                    fn_kwargs={"stages": stages}, batch_format="pyarrow", batch_size=batch_size,
                                    num_cpus=1, max_retries=0)
            if with_model:
                # A model actor regroups what it is handed into batches of one key (one bucket):
                # handed as many rows as the local engine holds for that, its batches come out full.
                held = 1 if alone else max(s.batch_size * s.held_batches for s in stages)
                data = data.map_batches(_ProcessBatch, fn_constructor_args=(stages,), batch_format="pyarrow",
                                        batch_size=held,
                                        # alone: the one row an actor's death takes with it
                                        compute=ray.data.ActorPoolStrategy(
                                            size=actors, max_tasks_in_flight_per_actor=1 if alone else None),
                                        num_gpus=num_gpus if gpus else 0, num_cpus=0,
                                        # A dead actor comes back (loading its models again); the
                                        # batch it held is not retried on it but goes to the next round.
                                        max_restarts=-1, max_task_retries=0)
        for batch in data.iter_batches(batch_format="pyarrow", batch_size=None):
            yield [(row["_stage"], pa.ipc.open_stream(row["_rows"]).read_all()) for row in batch.to_pylist()]
    finally:
        context.execution_options.preserve_order, context.max_errored_blocks = saved
        quiet.setLevel(level)
