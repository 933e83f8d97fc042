"""`curate score`: the scoring pass. One read and one decode per image feed every image
model asked for (CLIP, a tagger, OWLv2, image classifiers); the quality head then ranks the
stored CLIP embeddings. Each model writes its own table (classifiers share one) and resumes
on its own `model` value.
"""
from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from curate.devices import DeviceError
from curate.devices import check as check_device
from curate.models.common import ModelError
from curate.models.families import family, of_task
from curate.pipelines.executor import Summary, run
from curate.pipelines.stage import ModelStage


class RankStage(ModelStage):
    """The quality head on the embeddings table: only rows of the embedder it was trained on
    (`embedder`: that table's `model` value, chosen by score())."""

    source = "embeddings"
    columns = ("image_id", "model", "status", "embedding")

    def __init__(self, adapter, device=None, batch_size=None):
        super().__init__(adapter, device, batch_size)
        self.embedder = adapter.embedder

    def source_filter(self):
        return (pc.field("model") == self.embedder) & (pc.field("status") == "ok")

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


def embedder_choice(value: str) -> tuple[str, str | None]:
    """--clip: `hf_clip[:MODEL]`, `open_clip[:MODEL]` or an open_clip model alone (a directory, a
    hub id or a registry NAME:TAG, whose colon is not a family's)."""
    name, _, spec = value.partition(":")
    if name in [f.name for f in of_task("embed")]:
        return name, spec or None
    return "open_clip", value


def classifier_choice(value: str) -> str:
    """--classifier: `hf:MODEL`, a transformers image-classification checkpoint (MODEL alone works too)."""
    scheme, sep, spec = value.partition(":")
    if sep and scheme != "hf" and "/" not in scheme:
        raise ModelError(f"--classifier {value!r}: use hf:MODEL (MODEL a transformers image-classification "
                         "checkpoint: a directory or a hub id, e.g. hf:Falconsai/nsfw_image_detection)")
    return spec if sep and scheme == "hf" else value


def image_stages(clip=None, tagger=None, watermark=None, device=None, batch_size=None, *, classifiers=(),
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
        name, spec = embedder_choice(clip)
        adapters.append(family(name).load_adapter()(spec))
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
    adapters += [family("classifier").load_adapter()(classifier_choice(c)) for c in dict.fromkeys(classifiers or ())]
    names = [a.name for a in adapters if a.family == "classifier"]
    if len(set(names)) < len(names):
        raise ModelError(f"two --classifier models share the name {max(names, key=names.count)!r} (a repo's or "
                         "directory's name), which keys their labels in the manifest; rename a directory")
    return [ModelStage(adapter, device, batch_size) for adapter in adapters]


def score(ds, *, clip=None, quality=None, tagger=None, watermark=None, classifiers=(), where=None, engine="local",
          ray_address=None, device=None, batch_size=None, show_progress=True, **model_settings) -> list[Summary]:
    """Run the pass; model_settings are image_stages' thresholds and query."""
    if not (clip or quality or tagger or watermark or classifiers):
        raise ModelError("nothing to score: give --clip, --quality, --tagger, --watermark and/or --classifier")
    if engine == "local":  # a device that is not here fails now, not after the input is chosen
        try:
            check_device(device)
        except DeviceError as e:
            raise ModelError(str(e)) from None
    stages = image_stages(clip, tagger, watermark, device, batch_size, classifiers=classifiers, **model_settings)
    ranker = None
    if quality:
        ranker = RankStage(family("quality").load_adapter()(quality), device, batch_size)
        embedder = ranker.adapter.embedder
        if clip and not ranker.adapter.accepts(stages[0].model_key()):
            raise ModelError(f"the quality head {quality} was trained on embeddings from {embedder!r}, "
                             f"not {stages[0].model_key()!r}; pass the --clip it was trained with")
        ranker.embedder = stages[0].model_key() if clip else stored_embedder(ds, ranker.adapter)
    wanted = ds.select_ids(where)
    summaries = []
    if stages:
        summaries += run(ds, stages, engine=engine, ids=wanted, ray_address=ray_address, show_progress=show_progress)
    if ranker:
        summaries += rank(ds, ranker, wanted, engine, ray_address, show_progress)
    return summaries


def stored_embedder(ds, head) -> str:
    """The embeddings table's `model` the head ranks, when no --clip says it: the one there that
    it accepts (bigASP's scorer accepts its CLIP at any commit: the one with most rows)."""
    models = Counter(ds.read("embeddings", ["model"], filter=pc.field("status") == "ok").column("model").to_pylist())
    return next((m for m, _ in models.most_common() if head.accepts(m)), head.embedder)


def rank(ds, ranker: RankStage, wanted, engine, ray_address, show_progress) -> list[Summary]:
    """Rank the wanted images that have embeddings from the head's embedder and no rank yet."""
    embedded = set(ds.read("embeddings", ["image_id"], filter=ranker.source_filter()).column("image_id").to_pylist())
    if not embedded:
        raise ModelError(f"no embeddings from {ranker.embedder!r} to rank; run `curate score` with the "
                         f"--clip model that head was trained on")
    return run(ds, ranker, engine=engine, ray_address=ray_address, show_progress=show_progress,
               ids=[i for i in wanted if i in embedded])
