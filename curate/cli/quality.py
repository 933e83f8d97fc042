"""`curate quality ...`: rate pairs, import/export ratings, fit the quality head."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from curate.cli.common import DatasetArg, HostOpt, PortOpt, QuietOpt, WhereOpt, fail, open_dataset, serve_page
from curate.progress import console, print_summary
from curate.store import DatasetError

quality_app = typer.Typer(no_args_is_help=True, help="The quality head: head-to-head ratings -> pair model -> ELO -> "
                                                     "10 ranks.")

EmbedderOpt = Annotated[Optional[str], typer.Option("--embedder", help="The embeddings table's `model` to use "
                                                                       "(default: the only one there).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for pair choice, splits, tournament and training.")]


@quality_app.command()
def rate(
    dataset: DatasetArg,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8765,
    where: WhereOpt = None,
    rater: Annotated[Optional[str], typer.Option("--rater", help="Your name in the ratings table "
                                                                 "(default: the login name).")] = None,
    embedder: EmbedderOpt = None,
    seed: SeedOpt = 0,
):
    """Open a local web page that shows two images; pick the better one with the keyboard."""
    from curate.pipelines.quality.pairs import PairChooser
    from curate.pipelines.quality.ratings import choose_embedder, embedders, load_embeddings
    from curate.pipelines.quality.server import RatingSession, serve

    ds = open_dataset(dataset)
    try:
        ids = ds.select_ids(where)
        vectors = None
        if embedder or embedders(ds):  # with embeddings, pairs are chosen by the current model
            found, vectors = load_embeddings(ds, choose_embedder(ds, embedder), ids)
            if len(found) < len(ids):
                console.print(f"[yellow]{len(ids) - len(found)} images without embeddings are "
                              "left out of rating[/yellow]")
            ids = found
        session = RatingSession(ds, PairChooser(ids, vectors, seed=seed), rater)
        server = serve(session, host, port)
    except (DatasetError, ValueError, OSError) as e:
        fail(str(e))
    serve_page(server, "rating page", host)
    print_summary("quality rate", {"judgements this session": len(session.written), "ratings in total": session.total})


@quality_app.command()
def fit(
    dataset: DatasetArg,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="The head's directory "
                                                                         "(default: DS/heads/quality).")] = None,
    embedder: EmbedderOpt = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="bigasp: bigASP's tournament (8192 images from "
                                                                   "1500, K 10, 8192 rounds of random pairs, wins "
                                                                   "not probabilities); flags override it.")] = None,
    k: Annotated[Optional[float], typer.Option("--k", min=0.1, help="ELO K factor (default 32).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="ELO tournament rounds, one game per "
                                                                          "image per round (default 50, Swiss "
                                                                          "pairing).")] = None,
    sample: Annotated[Optional[int], typer.Option("--sample", min=2, help="Images in the tournament (a seeded "
                                                                          "random sample of the pool; default "
                                                                          "10000).")] = None,
    binning: Annotated[str, typer.Option("--binning", help="width: equal-width ELO bins; "
                                                           "quantile: equal-count bins.")] = "width",
    holdout: Annotated[float, typer.Option("--holdout", help="Share of rated pairs kept out "
                                                             "to measure accuracy.")] = 0.2,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="LAION aesthetic predictor .pth (or its folder) "
                                                                       "to compare on the held-out pairs "
                                                                       "(needs ViT-L/14 embeddings).")] = None,
    where: WhereOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Train the pair model, run the ELO tournament, bin into 10 ranks, train and save the rank head."""
    from pathlib import Path

    from curate.pipelines.quality.fit import fit_quality, recipe_settings

    ds = open_dataset(dataset)
    if ds.remote and not output:
        fail(f"{dataset} is in object storage, where the head is not written: give -o, a local folder for it")
    out = Path(output) if output else ds.root / "heads" / "quality"
    try:
        settings = recipe_settings(recipe, embedder=embedder, k=k, rounds=rounds, sample=sample, binning=binning,
                                   holdout=holdout, seed=seed, where=where, baseline=baseline)
        report = fit_quality(ds, out, settings, show_progress=not quiet)
    except (DatasetError, ValueError) as e:
        fail(str(e))
    histogram = report.pop("rank_histogram")
    report.pop("settings")
    print_summary(f"quality fit -> {out}", report)
    print_summary("images per rank (tournament)", {f"rank {r}": n for r, n in enumerate(histogram)})
    print(f"head: {out}")


@quality_app.command("import")
def import_(
    dataset: DatasetArg,
    file: Annotated[str, typer.Argument(help="CSV with columns left,right,winner (winner: left, right or tie); "
                                             "image ids or source paths.")],
    rater: Annotated[Optional[str], typer.Option("--rater", help="Rater for rows without a rater column "
                                                                 "(default: import:FILE).")] = None,
):
    """Add head-to-head judgements from a CSV file (all rows are checked first; a bad file writes nothing)."""
    from curate.pipelines.quality.ratings import import_csv

    ds = open_dataset(dataset)
    try:
        counts = import_csv(ds, file, rater)
    except (ValueError, UnicodeDecodeError) as e:
        fail(str(e))
    print_summary(f"quality import {file}", counts)


@quality_app.command()
def export(
    dataset: DatasetArg,
    file: Annotated[str, typer.Argument(help="CSV to write: left,right,winner,rater,created_at (image ids).")],
):
    """Write every judgement to a CSV file that `curate quality import` reads."""
    from curate.pipelines.quality.ratings import export_csv

    ds = open_dataset(dataset)
    print_summary(f"quality export -> {file}", {"judgements": export_csv(ds, file)})
