"""The Ray engine of the executor: Ray Data tasks prepare rows on every core, model actors
process them.

`run_ray` yields the same [(stage index, rows)] lists as the local engine, from the same
`prepare_row` and `process_pass`, so both engines write the same rows. The input is the
source table's parts, read by Ray tasks, or a source stage's rows (ingest: files and tar
members named on the driver, read by the tasks). `init_ray` joins a cluster
(`--ray-address`, RAY_ADDRESS) or starts a local one, and keeps Ray quiet.
"""
from __future__ import annotations

import os
import pickle
import warnings

import pyarrow as pa

from curate.pipelines.rows import input_columns, input_filter, input_rows, prepare_row, process_pass, setup_stages
from curate.pipelines.stage import Stage
from curate.store import Dataset

# Ray Data retries a task whose worker died forever by default: an image that crashes
# the decoder would hang the command. Two retries ride out a lost node; then it fails.
RAY_TASK_RETRIES = 2


def init_ray(ray_address: str | None = None):
    """Join the cluster at ray_address / RAY_ADDRESS, or start a local one; quietly."""
    import logging

    import ray

    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        # Ray's INFO lines and its token-auth notice are for cluster operators; our own
        # progress bar and summary say what users need. Errors still come through.
        kwargs = dict(log_to_driver=False, logging_level=logging.ERROR)
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


def _keep_todo(batch: pa.Table, stages: list[Stage], todo_ref: list) -> pa.Table:
    """Ray task (fused into the read): drop rows no stage of the pass has to do."""
    import ray

    return batch.filter(input_filter(stages, ray.get(todo_ref[0])))


def _prepare_batch(batch: pa.Table, stages: list[Stage], todo_ref: list) -> pa.Table:
    """Ray task: decode and prepare rows; results travel pickled (any shape)."""
    import ray

    todo = [None if ids is None else set(ids.to_pylist()) for ids in ray.get(todo_ref[0])]
    if "_row" in batch.column_names:  # a source stage's rows, pickled by the driver
        rows = [pickle.loads(b) for b in batch.column("_row").to_pylist()]
    else:
        rows = batch.to_pylist()
    key = stages[0].key
    prepared = [pickle.dumps(prepare_row(stages, r, todo), protocol=5) for r in rows]
    return pa.table({"_key": pa.array([r[key] for r in rows], pa.string()),
                     "_prepared": pa.array(prepared, pa.binary())})


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


def _prepare_and_process(batch: pa.Table, stages: list[Stage], todo_ref: list) -> pa.Table:
    """Ray task for a pass without a model (ingest, hash, buckets): both steps in one task,
    with no actor to hand rows to."""
    return _process_batch(stages, _prepare_batch(batch, stages, todo_ref))


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _input(ray, ds: Dataset, stages: list[Stage], everything: list[str] | None, batch_size: int):
    """The pass's input as a Ray Dataset in blocks of one batch, so work spreads over every core."""
    if everything is None:  # a source stage: its rows are named here, read and checked by the tasks
        # Pickled: paths may hold bytes that are not UTF-8, which Arrow strings cannot.
        rows = [{"_row": pickle.dumps(r)} for r in stages[0].inputs(ds)]
        if not rows:
            return None
        return ray.data.from_items(rows, override_num_blocks=-(-len(rows) // batch_size))
    parts = [str(p) for p in ds.parts(stages[0].source)]
    data = ray.data.read_parquet(parts).select_columns(input_columns(stages))  # pushed down into the read
    data = data.map_batches(_keep_todo,
                            fn_kwargs={"stages": stages, "todo_ref": [ray.put(pa.array(everything, pa.string()))]},
                            batch_format="pyarrow", batch_size=None)
    # A part holds thousands of rows and Ray makes one task per block: cut blocks to one
    # batch so decoding spreads over every core.
    return data.repartition(target_num_rows_per_block=batch_size)


def run_ray(ds: Dataset, stages: list[Stage], todo: list, everything: list[str] | None, ray_address: str | None):
    ray = init_ray(ray_address)
    gpus = ray.cluster_resources().get("GPU", 0)
    num_gpus = max(s.resources.gpus for s in stages)
    actors = max(1, int(gpus // num_gpus)) if num_gpus and gpus else 1
    batch_size = min(s.batch_size for s in stages)
    data = _input(ray, ds, stages, everything, batch_size)
    if data is None:
        return
    # Decoding runs as CPU tasks on every core; the models as a pool of actors that load
    # weights once. The actors ask for no CPU: with equal resource requests Ray Data
    # fuses the two steps into the actor, and all decoding would then run in the one
    # model actor, on one core. A model's own CPU work shares the cores.
    todo_ref = ray.put([None if t is None else pa.array(sorted(t), pa.string()) for t in todo])
    with warnings.catch_warnings():  # these remote args have no named parameter in map_batches yet
        warnings.simplefilter("ignore", DeprecationWarning)
        with_model = any(s.has_model for s in stages)
        data = data.map_batches(_prepare_batch if with_model else _prepare_and_process,
                                fn_kwargs={"stages": stages, "todo_ref": [todo_ref]},
                                batch_format="pyarrow", batch_size=batch_size, num_cpus=1,
                                max_retries=RAY_TASK_RETRIES)
        if with_model:
            data = data.map_batches(_ProcessBatch, fn_constructor_args=(stages,), batch_format="pyarrow",
                                    batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                                    num_gpus=num_gpus if gpus else 0, num_cpus=0,
                                    # A restarted actor would meet the same batch again; a rerun
                                    # of the command resumes instead. (Restartable actors also
                                    # make Ray log a spurious error line for every pool.)
                                    max_restarts=0)
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    # An ordered stage (ingest: the first copy of a file keeps its bytes) sees rows in input order.
    context.execution_options.preserve_order = any(s.ordered for s in stages)
    done: set[str] = set()
    try:
        for batch in data.iter_batches(batch_format="pyarrow", batch_size=None):
            results = [(row["_stage"], pa.ipc.open_stream(row["_rows"]).read_all()) for row in batch.to_pylist()]
            for k, table in results:
                done.update(table.column(stages[k].key).to_pylist())
            yield results
    except ray.exceptions.WorkerCrashedError:
        if everything is None:
            raise
        # A decode task's worker died and kept dying on retry: an image that crashes the
        # decoder (or memory running out). Finish the rest one image per task, so a death
        # names its image.
        yield from _isolate_crashes(ds, stages, todo, [i for i in everything if i not in done])
    finally:
        context.execution_options.preserve_order = preserve


def _isolate_crashes(ds: Dataset, stages: list[Stage], todo: list, remaining: list[str]):
    """Prepare each remaining image in its own Ray task (no retries); one whose worker dies
    gets a worker_died row. The models run here in the driver: this is the rare path."""
    import ray

    probe = ray.remote(max_retries=0, num_cpus=1)(prepare_row)
    setup_stages(stages)
    for rows in input_rows(ds, stages, remaining):
        # Each task gets only its own image's membership, not the whole to-do lists.
        wanted = [[{r["image_id"]} & t for t in todo] for r in rows]
        refs = [probe.remote(stages, r, w) for r, w in zip(rows, wanted)]
        prepared = []
        for ref, w in zip(refs, wanted):
            try:
                prepared.append(ray.get(ref))
            except ray.exceptions.WorkerCrashedError:
                died = {"_error": "worker_died", "_message": "the worker process died preparing this image"}
                prepared.append([dict(died) if ids else None for ids in w])
        yield process_pass(stages, [r["image_id"] for r in rows], prepared)
