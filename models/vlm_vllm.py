"""vLLM's offline engine for throughput on GPUs: continuous batching over the whole batch.

Optional and UNTESTED in this project's CI: vllm is not installed there (it needs a CUDA
GPU). The code follows vLLM's documented offline API (LLM.chat with image_url parts and
greedy SamplingParams); run `bench/caption.py --real-size --device cuda` on a GPU machine
with vllm installed to exercise it.
"""
from __future__ import annotations

from models.captioner import DTYPES, Captioner
from models.common import ModelError
from models.vlm_openai import jpeg_data_url


class VLLMCaptioner(Captioner):
    def load(self) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ModelError("--model vllm:... needs vLLM: pip install vllm (CUDA GPU required); "
                               "or use llava:/hf: for transformers generate") from None
        dtype = DTYPES.get(self.dtype, "auto")  # vLLM's names: float16, not fp16
        self.llm = LLM(model=self.spec.target, revision=self.spec.revision, dtype=dtype, limit_mm_per_prompt={"image": 1})
        self.params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)

    def prepare(self, image):
        return jpeg_data_url(image)  # the same inline JPEG data URL the HTTP backend sends

    def caption(self, images: list[str], prompts: list[str]) -> list[str]:
        conversations = [[{"role": "user", "content": [{"type": "text", "text": p},
                                                       {"type": "image_url", "image_url": {"url": url}}]}]
                         for url, p in zip(images, prompts)]
        outputs = self.llm.chat(conversations, self.params, use_tqdm=False)
        self.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text for o in outputs]
