"""Batched greedy generation with a model's own processor (left padding, chat template)."""

from __future__ import annotations

from typing import Any

from PIL import Image


def chat_text(processor: Any, n_images: int, prompt: str) -> str:
    """The model's chat prompt: the images, then ``prompt``, then the assistant's turn opening."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generation_inputs(
    processor: Any, model: Any, prompts: list[str], images: list[list[Image.Image]]
) -> dict[str, Any]:
    """Processor outputs for a left-padded batch, on the model's device and float dtype."""
    texts = [chat_text(processor, len(ims), p) for p, ims in zip(prompts, images, strict=True)]
    flat = [im for ims in images for im in ims]
    processor.tokenizer.padding_side = "left"
    # Idefics3 / SmolVLM count images per sample from a nested list
    nested = type(processor).__name__ in ("Idefics3Processor", "SmolVLMProcessor")
    batch_images = (images if nested else flat) if flat else None
    inputs = processor(text=texts, images=batch_images, padding=True, return_tensors="pt")
    device, dtype = model.device, model.dtype
    return {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) if hasattr(v, "to") else v
        for k, v in inputs.items()
    }


class Generator:
    """Greedy decoding of a batch of (prompt, images); returns the decoded answers, stripped."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int, min_new_tokens: int | None = None):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        tok = processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __call__(self, prompts: list[str], images: list[list[Image.Image]]) -> list[str]:
        import torch

        inputs = generation_inputs(self.processor, self.model, prompts, images)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=self.pad_token_id
        )
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
