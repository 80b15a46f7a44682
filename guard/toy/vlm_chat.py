"""The toy VLM behind the stand-in upstream: OpenAI-style turns in, generated text out."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from guard.toy.vlm import load_vlm


class ToyVLMChat:
    """Serves a LLaVA-style checkpoint (the toy VLM, or any small one) on the CPU.

    The conversation is reduced to what the toy model was trained on: the images of the
    request followed by the last text. One generation at a time: two cores gain nothing from
    interleaving two forward passes.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.model, self.processor = load_vlm(path)
        self.name = name or Path(path).name
        self._lock = threading.Lock()

    def generate(
        self, texts: Sequence[str], images: Sequence[Image.Image], params: dict[str, Any]
    ) -> Iterator[str]:
        content: list[dict[str, str]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": texts[-1] if texts else ""})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = self.processor(images=list(images) or None, text=[prompt], return_tensors="pt")
        max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or 16
        temperature = float(params.get("temperature") or 0.0)
        options: dict[str, Any] = {"max_new_tokens": int(max_tokens), "do_sample": temperature > 0}
        if temperature > 0:
            options["temperature"] = temperature
        with self._lock, torch.no_grad():
            if isinstance(params.get("seed"), int):
                torch.manual_seed(params["seed"])
            ids = self.model.generate(**inputs, **options)[0, inputs["input_ids"].shape[1] :]
        text = ""
        for i in range(len(ids)):
            # The answer follows "ASSISTANT:" after a space; the client should not see it.
            now = self.processor.decode(ids[: i + 1], skip_special_tokens=True).lstrip()
            if len(now) > len(text):
                yield now[len(text) :]
                text = now
