"""CLI options shared by every stage command, defined once so they read the same everywhere."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer


class Engine(str, Enum):
    local = "local"
    ray = "ray"


DatasetArg = Annotated[str, typer.Argument(help="The dataset directory.")]
WhereOpt = Annotated[Optional[str], typer.Option("--where", help="SQL predicate over the `manifest` view choosing the input, e.g. \"rank >= 5 AND NOT has_watermark\".")]
EngineOpt = Annotated[Engine, typer.Option("--engine", help="local: in-process; ray: Ray Data (CPU decode tasks feeding model actors).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", envvar="RAY_ADDRESS", help="Join an existing Ray cluster (default: start a local one).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per model batch (default: the stage's own).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:N or cpu (default: cuda when present).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, float32, float16 or bfloat16 (auto: float32 on CPU, bfloat16 on GPUs that have it, else float16).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
FormatOpt = Annotated[str, typer.Option("--format", help="table, csv, json (one object per line) or parquet.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write to this file instead of printing.")]
