"""One interface for every captioning backend, and the `--model` spec that picks one.

A spec is `SCHEME:TARGET`:

    llava:DIR_OR_HUB_ID          LLaVA family through transformers (llava-hf/llava-1.5-7b-hf, ...)
    joycaption:DIR_OR_HUB_ID     LLaVA-format JoyCaption (fancyfeast/llama-joycaption-beta-one-hf-llava)
    hf:DIR_OR_HUB_ID             any transformers image-text-to-text model (SmolVLM, Qwen2.5-VL, ...)
    florence2:DIR_OR_HUB_ID      Florence-2 (native transformers), prompt is a task token
    moondream:HUB_ID[@REVISION]  moondream2 through its remote code (needs transformers 4.x)
    vllm:DIR_OR_HUB_ID           vLLM's offline engine, when vllm is installed
    openai:BASE_URL#MODEL        an OpenAI-compatible server (vLLM, Ollama, LM Studio, ...)

A hub id in the transformers schemes may carry `@REVISION`. A captioner object keeps
settings only (it pickles to Ray workers); `load()` brings up the model once per worker;
`caption(images, prompts)` returns one raw output per image: a string, or a
`CaptionError` for that image alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from models.common import ModelError, model_name

DEFAULT_PROMPT = "Write a detailed description of this image in a few sentences."
JOYCAPTION_PROMPT = "Write a long descriptive caption for this image in a formal tone."
JOYCAPTION_SYSTEM = "You are a helpful image captioner."
FLORENCE_PROMPT = "<MORE_DETAILED_CAPTION>"
MOONDREAM_PROMPT = "caption:normal"  # moondream's own caption() call; any other prompt goes to query()
MOONDREAM_REVISION = "2025-01-09"


class CaptionError(Exception):
    """A failure for one image; `code` is an error code from curate.schema.ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class SpecError(ModelError):
    """A `--model` spec that does not parse; the message says what would be right."""


@dataclass(frozen=True)
class ModelSpec:
    scheme: str
    target: str  # a local directory, a hub id, or (openai) the base URL
    revision: str | None = None  # hub revision (transformers schemes, moondream)
    model_name: str | None = None  # openai: the served model's name

    def __str__(self) -> str:
        """How the spec is named in the `model` column: a hub id as is, a directory by its name."""
        if self.scheme == "openai":
            return f"openai:{self.target}#{self.model_name}"
        return f"{self.scheme}:{model_name(self.target)}" + (f"@{self.revision}" if self.revision else "")


SCHEMES = {
    "llava": "LLaVA family (llava-hf checkpoints) through transformers",
    "joycaption": "LLaVA-format JoyCaption through transformers",
    "hf": "any transformers image-text-to-text model (SmolVLM, Qwen2.5-VL, LLaVA-NeXT, ...)",
    "florence2": "Florence-2 through transformers (prompt = a task token)",
    "moondream": "moondream2 through its remote code (transformers 4.x only)",
    "vllm": "vLLM's offline engine (pip install vllm; GPU)",
    "openai": "an OpenAI-compatible chat-completions server",
}
EXAMPLES = ("llava:llava-hf/llava-1.5-7b-hf, llava:./models/tiny/llava, joycaption:fancyfeast/llama-joycaption-beta-one-hf-llava, "
            "hf:HuggingFaceTB/SmolVLM-256M-Instruct, moondream:vikhyatk/moondream2@2025-01-09, "
            "openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")


def parse_spec(text: str) -> ModelSpec:
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise SpecError(f"bad --model {text!r}: expected SCHEME:TARGET with SCHEME one of "
                        f"{', '.join(SCHEMES)}; for example {EXAMPLES}")
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


def default_prompt(spec: ModelSpec) -> str:
    return {"joycaption": JOYCAPTION_PROMPT, "florence2": FLORENCE_PROMPT, "moondream": MOONDREAM_PROMPT}.get(
        spec.scheme, DEFAULT_PROMPT)


class Captioner:
    """Settings in __init__, weights in load(), one raw output per image in caption()."""

    uses_gpu = True  # a Ray actor of this captioner asks for a GPU when the cluster has one

    def __init__(self, spec: ModelSpec, max_new_tokens: int, device: str | None = None, dtype: str | None = None):
        self.spec, self.max_new_tokens, self.device, self.dtype = spec, max_new_tokens, device, dtype
        self.generated_tokens = 0  # counted by backends that know it, for the benchmark

    def __getstate__(self) -> dict:
        """Pickle settings only: a loaded captioner still ships to Ray workers, which load their own model."""
        settings = {"spec", "max_new_tokens", "device", "dtype", "generated_tokens"} | set(getattr(self, "settings", ()))
        return {k: v for k, v in vars(self).items() if k in settings}

    def load(self) -> None:
        raise NotImplementedError

    def prepare(self, image: Image.Image):
        """CPU side, once per image, before batching: by default a copy no larger than needed."""
        image = image.copy()
        image.thumbnail((1024, 1024), Image.Resampling.BICUBIC)
        return image

    def caption(self, images: list, prompts: list[str]) -> list[str | CaptionError]:
        raise NotImplementedError


def make_captioner(spec: ModelSpec, max_new_tokens: int, device: str | None = None, dtype: str | None = None,
                   **http) -> Captioner:
    if spec.scheme == "openai":
        from models.vlm_openai import OpenAICaptioner

        return OpenAICaptioner(spec, max_new_tokens, **http)
    if dtype not in (None, "auto", *DTYPES):  # said before any model loads, for every backend
        raise SpecError(f"bad --dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    if spec.scheme == "vllm":
        from models.vlm_vllm import VLLMCaptioner

        return VLLMCaptioner(spec, max_new_tokens, device, dtype)
    from models.vlm_transformers import MoondreamCaptioner, TransformersCaptioner

    cls = MoondreamCaptioner if spec.scheme == "moondream" else TransformersCaptioner
    return cls(spec, max_new_tokens, device, dtype)


# ---- device and dtype ------------------------------------------------------------------
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def device_and_dtype(device: str | None, dtype: str | None):
    """models.common.pick_device's choice (cuda in bf16/fp16, cpu in fp32) unless --dtype says otherwise."""
    import torch

    from models.common import pick_device

    torch_device, torch_dtype = pick_device(device)
    if dtype in (None, "auto"):
        return torch_device, torch_dtype
    return torch_device, getattr(torch, DTYPES[dtype])
