"""`curate caption`: one natural-language caption per image per model and prompt.

The stage decodes each image once on CPU workers, lets the backend prepare it (a resized
copy, or a JPEG data URL for a server), generates for a batch, then cleans every output:
chat preambles ("The image shows ...") go, whitespace collapses, a sentence cut off by
the token limit is dropped, and a caption over --max-chars is cut at a sentence end.
The raw output is kept beside the clean one. An empty or garbage output (no words, mostly
symbols, a repetition loop) is an error row (`bad_output`), not a crash.
"""
from __future__ import annotations

import re
from collections import Counter

from curate.devices import DeviceError, dtype_name
from curate.models.captioner import CaptionError, make_captioner, parse_spec
from curate.models.common import ModelError
from curate.pipelines.stage import ModelStage, Resources

# Chatty openings VLMs put before the actual description; removed repeatedly from the start.
_NOUN = r"(?:image|picture|photo|photograph|illustration|artwork|painting|drawing|scene|render(?:ing)?|screenshot)"
_VERB = r"(?:shows|depicts|features|displays|presents|showcases|captures|portrays|contains|illustrates|is of)"
PREAMBLES = [re.compile(p, re.IGNORECASE) for p in (
    r"^(?:sure|certainly|of course|okay|ok)\b[,!.:]*\s*",
    r"^here(?:'s| is) (?:a|an|the) (?:detailed |brief |short )?(?:description|caption)"
    r"(?: of (?:the|this) " + _NOUN + r")?\s*[:.]?\s*",
    r"^(?:the|this) " + _NOUN + r" (?:you provided |you've provided )?" + _VERB + r"\s+",
    r"^(?:this|it) (?:is|appears to be|seems to be) (?:a|an) " + _NOUN + r" (?:of|showing|depicting|featuring)\s+",
    r"^(?:in|within) (?:the|this) " + _NOUN + r",?\s+(?:we (?:can )?see|you can see|there (?:is|are))?\s*",
    r"^(?:a|an) " + _NOUN + r" of\s+",
)]
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def clean_caption(raw: str, max_chars: int | None = None) -> str:
    text = " ".join(raw.replace("\u200b", " ").split())  # collapse all whitespace, newlines included
    text = text.strip(" \"'")
    stripped = True
    while stripped and text:
        stripped = False
        for pattern in PREAMBLES:
            new = pattern.sub("", text, count=1)
            if new != text:
                text, stripped = new, True
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    text = drop_unfinished_sentence(text)
    if max_chars and len(text) > max_chars:
        text = cut_at_sentence(text, max_chars)
    return text.strip()


def drop_unfinished_sentence(text: str) -> str:
    """A caption the token limit cut mid-sentence keeps its complete sentences (if it has one)."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    if ends and ends[-1] < len(text):
        return text[: ends[-1]]
    return text


def cut_at_sentence(text: str, max_chars: int) -> str:
    """The longest run of whole sentences within max_chars; else whole words, else a hard cut."""
    ends = [m.end() for m in SENTENCE_END.finditer(text) if m.end() <= max_chars]
    if ends:
        return text[: ends[-1]]
    words = text[: max_chars + 1].rsplit(" ", 1)[0] if " " in text[:max_chars] else text[:max_chars]
    return words[:max_chars].rstrip(",;: ")


def garbage_reason(text: str) -> str | None:
    """Why a cleaned caption cannot be stored, or None if it can."""
    if not text:
        return "empty caption"
    letters = sum(c.isalpha() for c in text)
    if letters == 0:
        return "no letters in the caption"
    if "\ufffd" in text:
        return "undecodable bytes in the caption"
    if letters < 0.5 * len(text.replace(" ", "")):
        return "mostly symbols, not words"
    words = re.findall(r"\w+", text.lower())
    if len(words) >= 8:  # greedy decoding stuck in a loop ("pink pink pink ...")
        word, count = Counter(words).most_common(1)[0]
        if count > len(words) / 2:
            return f"a repetition loop ({word!r} is {count} of {len(words)} words)"
    return None


class CaptionStage(ModelStage):
    """A captioner's raw outputs, cleaned; the raw output is kept beside the clean one."""

    def __init__(self, model: str, prompt: str | None = None, max_new_tokens: int = 160, *,
                 batch_size: int | None = None, device: str | None = None, dtype: str | None = None,
                 max_chars: int | None = None, **http):
        spec = parse_spec(model)  # SpecError here: a bad --model fails before any work
        try:
            dtype_name(dtype)  # said before any model loads, for every backend
        except DeviceError as e:
            raise ModelError(str(e)) from None
        captioner = make_captioner(spec, prompt=prompt, max_new_tokens=max_new_tokens, **http)
        super().__init__(captioner, device, batch_size, dtype)
        self.captioner, self.prompt, self.max_chars = captioner, captioner.prompt, max_chars
        if not captioner.uses_gpu:
            self.resources = Resources(self.resources.cpus, gpus=0)

    def process(self, batch):
        outputs = self.captioner.forward(batch)["raw"]
        rows = {"prompt": [self.prompt] * len(outputs), "caption": [], "raw": [], "_error": [], "_message": []}
        for out in outputs:
            caption, error, message = None, None, None
            if isinstance(out, CaptionError):
                error, message = out.code, str(out)
            else:
                caption = clean_caption(out, self.max_chars)
                reason = garbage_reason(caption)
                if reason:
                    caption, error, message = None, "bad_output", f"{reason}; raw output: {out[:200]!r}"
            rows["caption"].append(caption)
            rows["raw"].append(None if isinstance(out, CaptionError) else out)
            rows["_error"].append(error)
            rows["_message"].append(message)
        return rows
