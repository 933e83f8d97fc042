"""One adapter interface for every captioning backend, and the `--model` spec that picks one.

A spec is `SCHEME:TARGET`, the scheme a caption family of curate.models.families:

    llava:DIR_OR_HUB_ID          LLaVA family through transformers (llava-hf/llava-1.5-7b-hf, ...)
    joycaption:DIR_OR_HUB_ID     LLaVA-format JoyCaption (fancyfeast/llama-joycaption-beta-one-hf-llava)
    hf:DIR_OR_HUB_ID             any transformers image-text-to-text model (SmolVLM, Qwen2.5-VL, ...)
    florence2:DIR_OR_HUB_ID      Florence-2 (native transformers), prompt is a task token
    moondream:HUB_ID[@REVISION]  moondream2 through its remote code (needs transformers 4.x)
    vllm:DIR_OR_HUB_ID           vLLM's offline engine, when vllm is installed
    openai:BASE_URL#MODEL        an OpenAI-compatible server (vLLM, Ollama, LM Studio, ...)

A hub id in the transformers schemes may carry `@REVISION`; it is pinned to the commit that
revision points at (curate.models.common.pin), which its rows name and its workers load. A
directory alone (no scheme)
is recognised from its config.json. A captioner keeps settings only (it pickles to Ray
workers); `load()` brings up the model once per worker; `caption(images, prompts)` returns
one raw output per image: a string, or a `CaptionError` for that image alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from curate.models.common import Adapter, ModelError, hub_repo, model_name
from curate.models.families import family, of_task

JOYCAPTION_SYSTEM = "You are a helpful image captioner."
MOONDREAM_REVISION = "2025-01-09"


class CaptionError(Exception):
    """A failure for one image; `code` is an error code from curate.schema.ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # pickles (to and from Ray workers) with both arguments
        return CaptionError, (self.code, str(self))


class SpecError(ModelError):
    """A `--model` spec that does not parse; the message says what would be right."""


@dataclass(frozen=True)
class ModelSpec:
    scheme: str
    target: str  # a local directory, a hub id, or (openai) the base URL
    revision: str | None = None  # hub revision (transformers schemes, moondream)
    model_name: str | None = None  # openai: the served model's name

    def weights(self) -> str:
        """How the weights are named in the `model` value: a hub id as is, a directory by its name."""
        if self.scheme == "openai":
            return f"{self.target}#{self.model_name}"
        return model_name(self.target) + (f"@{self.revision}" if self.revision else "")

    def __str__(self) -> str:
        return f"{self.scheme}:{self.weights()}"


EXAMPLES = ("llava:llava-hf/llava-1.5-7b-hf, llava:./models/tiny/llava, ./models/tiny/llava, "
            "joycaption:fancyfeast/llama-joycaption-beta-one-hf-llava, hf:HuggingFaceTB/SmolVLM-256M-Instruct, "
            "moondream:vikhyatk/moondream2@2025-01-09, openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
# config.json's model_type -> the scheme that loads it, for a directory given without one
MODEL_TYPES = {"llava": "llava", "florence2": "florence2", "moondream1": "moondream"}


def parse_spec(text: str) -> ModelSpec:
    schemes = [f.name for f in of_task("caption")]
    scheme, sep, rest = text.partition(":")
    if scheme not in schemes and Path(text).expanduser().is_dir():
        scheme, sep, rest = recognise(Path(text).expanduser()), ":", text
    if not sep or scheme not in schemes or not rest:
        raise SpecError(f"bad --model {text!r}: expected SCHEME:TARGET with SCHEME one of "
                        f"{', '.join(schemes)}, or a model directory; for example {EXAMPLES}")
    if scheme == "openai":
        url, _, name = rest.partition("#")
        if not url.startswith(("http://", "https://")) or not name:
            raise SpecError(f"bad --model {text!r}: an OpenAI-compatible server is openai:BASE_URL#MODEL, "
                            "e.g. openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
        return ModelSpec(scheme, url.rstrip("/"), model_name=name)
    target, _, revision = rest.partition("@")
    if not target:
        raise SpecError(f"bad --model {text!r}: give a local directory or a hub id after {scheme}:")
    if scheme == "moondream":
        revision = revision or MOONDREAM_REVISION
    local = Path(target).expanduser()
    if local.is_dir():  # Ray workers may run elsewhere in the tree: give them the absolute path
        target = str(local.resolve())
    return ModelSpec(scheme, target, revision or None)


def recognise(folder: Path) -> str:
    """The caption scheme for a model directory, from its config.json: LLaVA, Florence-2 and
    moondream by their model_type; any other image-text-to-text model through `hf`."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise SpecError(f"bad --model {str(folder)!r}: the directory has no readable config.json, so its model "
                        f"family is unknown; name it as SCHEME:{folder} (for example llava:{folder})") from None
    return MODEL_TYPES.get(config.get("model_type"), "hf")


class Captioner(Adapter):
    """Settings in __init__, weights in load(), one raw output per image in caption()."""

    uses_gpu = True  # a Ray actor of this captioner asks for a GPU when the cluster has one
    batch_size = 16
    decode_min_side = 768  # enough for every captioner's input size (LLaVA 336, SigLIP 384-448, Qwen dynamic)

    def __init__(self, spec: ModelSpec, prompt: str | None = None, max_new_tokens: int | None = None, **settings):
        self.family = spec.scheme
        named = spec.target + (f"@{spec.revision}" if spec.revision else "")
        super().__init__(named, prompt=prompt, max_new_tokens=max_new_tokens, **settings)
        if hub_repo(named):  # the weights, pinned: org/name@COMMIT
            spec = replace(spec, revision=self.weights.rpartition("@")[2])
        self.spec = spec
        self.prompt, self.max_new_tokens = self.settings["prompt"], self.settings["max_new_tokens"]
        if not self.prompt.strip():
            raise ModelError("the prompt is empty")
        self.generated_tokens = 0  # counted by backends that know it, for the benchmark

    def model_value(self) -> str:
        return family(self.family).model_value(self.spec.weights(), self.settings)

    def preprocess(self, image) -> dict:
        """CPU side, once per image, before batching: by default a copy no larger than needed."""
        small = image.image.copy()
        small.thumbnail((1024, 1024), Image.Resampling.BICUBIC)
        return {"input": small}

    def forward(self, batch: dict) -> dict:
        return {"raw": self.caption(list(batch["input"]), [self.prompt] * len(batch["input"]))}

    def caption(self, images: list, prompts: list[str]) -> list[str | CaptionError]:
        raise NotImplementedError


def make_captioner(spec: ModelSpec, **settings) -> Captioner:
    """The adapter of the spec's family, with its settings (prompt, max_new_tokens, ...)."""
    return family(spec.scheme).load_adapter()(spec, **settings)
