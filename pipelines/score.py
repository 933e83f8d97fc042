"""`curate score`: the scoring pass. One read and one decode per image feed every image
model asked for (CLIP, a tagger, OWLv2); the quality head then ranks the stored CLIP
embeddings. Each model writes its own table and resumes on its own `model` value.
"""
from __future__ import annotations

from models.common import ModelError, pick_device
from pipelines.runner import Summary, run_stage, run_stages

TAGGERS = ("wd14", "joytag")
DETECTORS = ("owlv2",)


def parse_choice(option: str, value: str, families: tuple[str, ...]) -> tuple[str, str | None]:
    """'family:MODEL' (or just 'family' for its default weights) -> (family, MODEL or None)."""
    name, _, spec = value.partition(":")
    if name not in families:
        choices = " or ".join(f"{f}:MODEL" for f in families)
        raise ModelError(f"{option} {value!r}: unknown model family {name!r}; use {choices} "
                         "(MODEL a local directory or a hub id; omit ':MODEL' for the default weights)")
    return name, spec or None


def image_stages(clip=None, tagger=None, watermark=None, device=None, batch_size=None, *,
                 general_threshold=None, character_threshold=None, watermark_threshold=None,
                 watermark_query=None) -> list:
    """The stages of the image pass, in the order they appear in the summary.

    A setting left as None keeps the model family's default (WD14 general 0.35 and
    character 0.85, JoyTag 0.4, OWLv2 0.1 for "a watermark").
    """
    if not tagger and (general_threshold is not None or character_threshold is not None):
        raise ModelError("--general-threshold and --character-threshold set a tagger's thresholds; give --tagger too")
    if not watermark and (watermark_threshold is not None or watermark_query is not None):
        raise ModelError("--watermark-threshold and --watermark-query set the detector; give --watermark too")
    stages = []
    if clip:
        from models.clip import ClipEmbedder

        stages.append(ClipEmbedder(clip, device, batch_size))
    if tagger:
        name, spec = parse_choice("--tagger", tagger, TAGGERS)
        if name == "wd14":
            from models.wd14 import DEFAULT_WD14, WD14Tagger

            stages.append(WD14Tagger(spec or DEFAULT_WD14, device, batch_size,
                                     **settings(general=general_threshold, character=character_threshold)))
        else:
            from models.joytag import DEFAULT_JOYTAG, JoyTagger

            if character_threshold is not None:
                raise ModelError("--character-threshold: JoyTag has one threshold for all its tags; "
                                 "use --general-threshold")
            stages.append(JoyTagger(spec or DEFAULT_JOYTAG, device, batch_size,
                                    **settings(threshold=general_threshold)))
    if watermark:
        _, spec = parse_choice("--watermark", watermark, DETECTORS)
        from models.owlv2 import DEFAULT_OWLV2, WatermarkDetector

        stages.append(WatermarkDetector(spec or DEFAULT_OWLV2, device, batch_size,
                                        **settings(threshold=watermark_threshold, query=watermark_query)))
    return stages


def settings(**given) -> dict:
    """The settings the user gave; the rest keep the model's own defaults."""
    return {k: v for k, v in given.items() if v is not None}


def score(ds, *, clip=None, quality=None, tagger=None, watermark=None, where=None, engine="local",
          ray_address=None, device=None, batch_size=None, show_progress=True, **model_settings) -> list[Summary]:
    """Run the pass; model_settings are image_stages' thresholds and query."""
    if not (clip or quality or tagger or watermark):
        raise ModelError("nothing to score: give --clip, --quality, --tagger and/or --watermark")
    if engine == "local":
        pick_device(device)  # a device that is not here fails now, not after the input is chosen
    stages = image_stages(clip, tagger, watermark, device, batch_size, **model_settings)
    ranker = None
    if quality:
        from models.quality import QualityRanker

        ranker = QualityRanker(quality, device, batch_size)
        if clip and stages[0].model_key() != ranker.embedder:
            raise ModelError(f"the quality head {quality} was trained on embeddings from {ranker.embedder!r}, "
                             f"not {stages[0].model_key()!r}; pass the --clip it was trained with")
    wanted = ds.select_ids(where)
    summaries = []
    if stages:
        summaries += run_stages(ds, stages, engine=engine, ids=wanted, ray_address=ray_address,
                                show_progress=show_progress)
    if ranker:
        summaries.append(rank(ds, ranker, wanted, engine, ray_address, show_progress))
    return summaries


def rank(ds, ranker, wanted, engine, ray_address, show_progress) -> Summary:
    """Rank the wanted images that have embeddings from the head's embedder and no rank yet."""
    embedded = set(ds.read("embeddings", ["image_id"], filter=ranker.source_filter()).column("image_id").to_pylist())
    if not embedded:
        raise ModelError(f"no embeddings from {ranker.embedder!r} to rank; run `curate score` with the "
                         f"--clip model that head was trained on")
    return run_stage(ds, ranker, engine=engine, ray_address=ray_address, show_progress=show_progress,
                     ids=[i for i in wanted if i in embedded])
