"""Captioners on transformers: the image-text-to-text family (LLaVA, JoyCaption, Florence-2,
SmolVLM, Qwen2.5-VL) through AutoProcessor + AutoModelForImageTextToText, and moondream2
through its remote code.

Batched generation pads a decoder-only model's prompts on the left, so every row's prompt ends
where generation starts, and an encoder-decoder's (Florence-2) on the right, so its encoder's
learned positions start at 0 as they do for a prompt alone; decoding is greedy: a row's
caption does not depend on what else is in its batch.
Each model's own processor does its image preprocessing.
"""
from __future__ import annotations

from pathlib import Path

from curate.models.captioner import JOYCAPTION_SYSTEM, Captioner
from curate.models.common import ModelError, check_files, device_or_error
from curate.models.families import MOONDREAM_PROMPT


def _load_error(spec, e: Exception) -> ModelError:
    if spec.target.startswith((".", "/", "~")) and not Path(spec.target).expanduser().is_dir():
        return ModelError(f"cannot load {spec.scheme}:{spec.target}: no such model directory")
    return ModelError(f"cannot load {spec.scheme}:{spec.target}: {type(e).__name__}: {e}. A hub id needs the network "
                        "or a copy in the Hugging Face cache; a local directory needs the files save_pretrained writes "
                        "(config.json, weights, processor and tokenizer files)")


class Transformers(Captioner):
    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._device, self._dtype = device_or_error(device, dtype)
        if Path(self.spec.target).is_dir():
            check_files(self.spec.target)
        try:
            self._processor = AutoProcessor.from_pretrained(self.spec.target, revision=self.spec.revision)
            model = AutoModelForImageTextToText.from_pretrained(self.spec.target, revision=self.spec.revision,
                                                                dtype=self._dtype)
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(self.spec, e) from None
        self._model = model.to(self._device).eval()
        tokenizer = getattr(self._processor, "tokenizer", None)
        if tokenizer is not None:  # a decoder-only model continues from the right end of every row
            tokenizer.padding_side = "right" if model.config.is_encoder_decoder else "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._pad_id = tokenizer.pad_token_id
        self._system = JOYCAPTION_SYSTEM if self.spec.scheme == "joycaption" else None
        self._inference_mode = torch.inference_mode

    def prompt_text(self, prompt: str) -> str:
        """The model's own chat template around one image and the prompt; Florence-2 takes the bare prompt."""
        if not getattr(self._processor, "chat_template", None):
            return prompt
        image_token = getattr(self._processor, "image_token", None)
        if self._system:  # JoyCaption's template takes plain-string turns and places the image itself
            messages = [{"role": "system", "content": self._system}, {"role": "user", "content": prompt}]
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if image_token and image_token not in text:
            text = text.replace(prompt, f"{image_token}\n{prompt}", 1)
        return text

    def caption(self, images: list, prompts: list[str]) -> list[str]:
        rendered = {p: self.prompt_text(p) for p in set(prompts)}  # a batch usually shares one prompt
        texts = [rendered[p] for p in prompts]
        # One image list per prompt: SmolVLM/Idefics3 need the nesting, the rest flatten it.
        inputs = self._processor(images=[[image] for image in images], text=texts, padding=True, return_tensors="pt")
        inputs = {k: (v.to(self._device, self._dtype) if v.is_floating_point() else v.to(self._device))
                  for k, v in inputs.items()}
        with self._inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        # Decoder-only models echo the prompt; encoder-decoders (Florence-2) return only new tokens.
        new = out if self._model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
        if getattr(self, "_pad_id", None) is not None:
            self.generated_tokens += int((new != self._pad_id).sum())
        return self._processor.batch_decode(new, skip_special_tokens=True)


class Moondream(Captioner):
    """moondream2 (vikhyatk/moondream2) through its remote code, at a pinned revision.

    Its code builds the model the transformers 4 way; transformers 5 constructs models on
    the meta device and expects hooks that code lacks (loading fails, or yields garbage),
    so this route needs transformers >=4.44,<5 in the environment that runs it. Untested
    here: this project's environment has transformers 5 and no network to fetch the code.
    The model has no batched API: images are captioned one by one.
    """

    def __init__(self, spec, prompt: str | None = None, max_new_tokens: int | None = None, **settings):
        import transformers

        if int(transformers.__version__.split(".")[0]) >= 5:  # said before the hub is asked for anything
            raise ModelError(f"moondream2's remote code needs transformers >=4.44,<5; this environment has "
                             f"{transformers.__version__}. Run it from an environment with transformers 4.x "
                             "(pip install 'transformers>=4.44,<5'), or serve moondream behind an OpenAI-compatible "
                             "server (moondream-station, vLLM) and use --model openai:URL#NAME")
        super().__init__(spec, prompt, max_new_tokens, **settings)

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self._device, torch_dtype = device_or_error(device, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.spec.target, revision=self.spec.revision,
                                                         trust_remote_code=True, torch_dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise _load_error(self.spec, e) from None
        self._model = model.to(self._device).eval()

    def caption(self, images: list, prompts: list[str]) -> list[str]:
        settings = {"max_tokens": self.max_new_tokens}
        out = []
        for image, prompt in zip(images, prompts):
            if prompt.startswith("caption:"):  # caption:short / caption:normal / caption:long
                length = prompt.partition(":")[2] or MOONDREAM_PROMPT.partition(":")[2]
                out.append(self._model.caption(image, length=length, settings=settings)["caption"])
            else:
                out.append(self._model.query(image, prompt, settings=settings)["answer"])
        return out
