"""What every command shares: its options, defined once so they read the same everywhere,
and the one way a command says that the user must fix something (`fail`: one line, exit 2)."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, NoReturn, Optional

import typer

from curate.devices import DTYPE_HELP
from curate.progress import console
from curate.store import Dataset, DatasetError


class Engine(str, Enum):
    local = "local"
    ray = "ray"


DatasetArg = Annotated[str, typer.Argument(help="The dataset directory.")]
WhereOpt = Annotated[Optional[str], typer.Option("--where", help="SQL predicate over the `manifest` view choosing the "
                                                                 "input, e.g. \"rank >= 5 AND NOT has_watermark\".")]
EngineOpt = Annotated[Engine, typer.Option("--engine", help="local: in-process; "
                                                            "ray: Ray Data (CPU tasks feeding model actors).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", envvar="RAY_ADDRESS", help="Join an existing "
                                                      "Ray cluster (default: start a local one).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per model batch "
                                                                                 "(default: the model's own).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:N or cpu (default: cuda when present).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help=DTYPE_HELP + ".")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
FormatOpt = Annotated[str, typer.Option("--format", help="table, csv, json (one object per line) or parquet.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write to this file instead of printing.")]


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def open_dataset(path: str) -> Dataset:
    try:
        return Dataset(path)
    except DatasetError as e:
        fail(str(e))
