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
HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on; the default is this machine only.")]
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")]


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def open_dataset(path: str) -> Dataset:
    try:
        return Dataset(path)
    except DatasetError as e:
        fail(str(e))


def serve_page(server, name: str, host: str) -> None:
    """Print a local page's address, then serve it until Ctrl-C (warning first when others can reach it)."""
    from curate.web import LOOPBACK_NAMES

    bound_host, bound_port = server.server_address[:2]
    if host not in LOOPBACK_NAMES:
        console.print(f"[yellow]listening on {host}: anyone who can reach this machine can see the "
                      "images and change what is stored[/yellow]")
    try:  # the address is printed inside: a Ctrl-C right after it still ends with the summary
        print(f"{name}: http://{bound_host}:{bound_port}/  (Ctrl-C to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
