"""`curate score`: the scoring pass. One read and one decode per image feed every image
model asked for (CLIP, a tagger, OWLv2); the quality head then ranks the stored CLIP
embeddings. Each model writes its own table and resumes on its own `model` value.
"""
from __future__ import annotations

import pyarrow.compute as pc

from curate.devices import DeviceError
from curate.devices import check as check_device
from curate.models.common import ModelError
from curate.models.families import family, of_task
from curate.pipelines.executor import Summary, run
from curate.pipelines.stage import ModelStage


class RankStage(ModelStage):
    """The quality head on the embeddings table: only rows of the embedder it was trained on."""

    source = "embeddings"
    columns = ("image_id", "model", "status", "embedding")

    def source_filter(self):
        return (pc.field("model") == self.adapter.embedder) & (pc.field("status") == "ok")

    def prepare(self, row):
        return self.adapter.preprocess(row["embedding"])


def parse_choice(option: str, value: str, task: str) -> tuple[str, str | None]:
    """'family:MODEL' (or just 'family' for its default weights) -> (family, MODEL or None)."""
    name, _, spec = value.partition(":")
    names = [f.name for f in of_task(task)]
    if name not in names:
        choices = " or ".join(f"{f}:MODEL" for f in names)
        raise ModelError(f"{option} {value!r}: unknown model family {name!r}; use {choices} "
                         "(MODEL a local directory or a hub id; omit ':MODEL' for the default weights)")
    return name, spec or None


def image_stages(clip=None, tagger=None, watermark=None, device=None, batch_size=None, *,
                 general_threshold=None, character_threshold=None, watermark_threshold=None,
                 watermark_query=None) -> list[ModelStage]:
    """The stages of the image pass, in the order they appear in the summary.

    A setting left as None keeps the model family's default (curate.models.families)."""
    if not tagger and (general_threshold is not None or character_threshold is not None):
        raise ModelError("--general-threshold and --character-threshold set a tagger's thresholds; give --tagger too")
    if not watermark and (watermark_threshold is not None or watermark_query is not None):
        raise ModelError("--watermark-threshold and --watermark-query set the detector; give --watermark too")
    adapters = []
    if clip:
        adapters.append(family("open_clip").load_adapter()(clip))
    if tagger:
        name, spec = parse_choice("--tagger", tagger, "tag")
        if name == "joytag" and character_threshold is not None:
            raise ModelError("--character-threshold: JoyTag has one threshold for all its tags; "
                             "use --general-threshold")
        settings = ({"general": general_threshold, "character": character_threshold} if name == "wd14"
                    else {"threshold": general_threshold})
        adapters.append(family(name).load_adapter()(spec, **settings))
    if watermark:
        name, spec = parse_choice("--watermark", watermark, "watermark")
        adapters.append(family(name).load_adapter()(spec, query=watermark_query, threshold=watermark_threshold))
    return [ModelStage(adapter, device, batch_size) for adapter in adapters]


def score(ds, *, clip=None, quality=None, tagger=None, watermark=None, where=None, engine="local",
          ray_address=None, device=None, batch_size=None, show_progress=True, **model_settings) -> list[Summary]:
    """Run the pass; model_settings are image_stages' thresholds and query."""
    if not (clip or quality or tagger or watermark):
        raise ModelError("nothing to score: give --clip, --quality, --tagger and/or --watermark")
    if engine == "local":  # a device that is not here fails now, not after the input is chosen
        try:
            check_device(device)
        except DeviceError as e:
            raise ModelError(str(e)) from None
    stages = image_stages(clip, tagger, watermark, device, batch_size, **model_settings)
    ranker = None
    if quality:
        ranker = RankStage(family("quality").load_adapter()(quality), device, batch_size)
        embedder = ranker.adapter.embedder
        if clip and stages[0].model_key() != embedder:
            raise ModelError(f"the quality head {quality} was trained on embeddings from {embedder!r}, "
                             f"not {stages[0].model_key()!r}; pass the --clip it was trained with")
    wanted = ds.select_ids(where)
    summaries = []
    if stages:
        summaries += run(ds, stages, engine=engine, ids=wanted, ray_address=ray_address, show_progress=show_progress)
    if ranker:
        summaries += rank(ds, ranker, wanted, engine, ray_address, show_progress)
    return summaries


def rank(ds, ranker: RankStage, wanted, engine, ray_address, show_progress) -> list[Summary]:
    """Rank the wanted images that have embeddings from the head's embedder and no rank yet."""
    embedded = set(ds.read("embeddings", ["image_id"], filter=ranker.source_filter()).column("image_id").to_pylist())
    if not embedded:
        raise ModelError(f"no embeddings from {ranker.adapter.embedder!r} to rank; run `curate score` with the "
                         f"--clip model that head was trained on")
    return run(ds, ranker, engine=engine, ray_address=ray_address, show_progress=show_progress,
               ids=[i for i in wanted if i in embedded])
