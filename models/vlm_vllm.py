"""vLLM's offline engine for throughput on GPUs: continuous batching over the whole batch.

Optional and UNTESTED in this project's CI: vllm is not installed there (it needs a CUDA
GPU). The code follows vLLM's documented offline API (LLM.chat with image_url parts and
greedy SamplingParams); run `bench/caption.py --real-size --device cuda` on a GPU machine
with vllm installed to exercise it.
"""
from __future__ import annotations

from curate.devices import DTYPES, dtype_name
from curate.models.captioner import Captioner
from curate.models.common import ModelError
from curate.models.vlm_openai import jpeg_data_url


class VLLM(Captioner):
    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ModelError("--model vllm:... needs vLLM: pip install vllm (CUDA GPU required); "
                               "or use llava:/hf: for transformers generate") from None
        short = dtype_name(dtype)
        name = DTYPES[short] if short else "auto"  # vLLM's names: float16, not fp16
        self._llm = LLM(model=self.spec.target, revision=self.spec.revision, dtype=name,
                        limit_mm_per_prompt={"image": 1})
        self._params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)

    def preprocess(self, image):
        return {"input": jpeg_data_url(image.image)}  # the same inline JPEG data URL the HTTP backend sends

    def caption(self, images: list[str], prompts: list[str]) -> list[str]:
        conversations = [[{"role": "user", "content": [{"type": "text", "text": p},
                                                       {"type": "image_url", "image_url": {"url": url}}]}]
                         for url, p in zip(images, prompts)]
        outputs = self._llm.chat(conversations, self._params, use_tqdm=False)
        self.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text for o in outputs]
