"""Find the parts of an OpenAI request the guard judges, and rewrite images for forwarding.

Chat bodies carry text and images inside ``messages[i].content``; a content is either a string
or a list of typed parts. The guard judges every text part of every message (a harmful
instruction can hide in a system or assistant turn as well as a user turn) and every
``image_url`` part, and the tools offered and called (their text reaches the model through the
chat template). Media parts it cannot inspect (video, audio, image embeddings) are refused
rather than waved through, and so are top-level fields that change how the upstream renders or
embeds the prompt (``RiskyFields``; the list and the action are configuration).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.config import RequestsConfig
from guard.errors import InvalidRequest
from guard.metrics import Metrics
from guard.types import ImageInput

log = logging.getLogger(__name__)

# vLLM accepts more multimodal part types than OpenAI; none of these can be checked here.
UNCHECKABLE_PARTS = frozenset(
    {"video_url", "audio_url", "input_audio", "image_embeds", "image_pil", "file", "input_file"}
)


class RiskyFields:
    """Refuses, or strips, the body fields of ``requests.risky_fields``.

    Stripping edits the body in place: the transports parse a fresh object for each request and
    hand that same object on, so what is judged, audited and forwarded is the stripped body. A
    field whose value is null is absent (vLLM's default), and is left as it is.
    """

    def __init__(self, cfg: RequestsConfig, metrics: Metrics | None = None) -> None:
        self._fields = tuple(cfg.risky_fields)
        self._action = cfg.risky_action
        self._counter = metrics.risky_fields if metrics is not None else None
        if self._counter is not None:
            for name in self._fields:  # zeros, not gaps, for every configured field
                self._counter.labels(name, self._action)

    def apply(self, request_id: str, body: Mapping[str, Any]) -> None:
        found = [name for name in self._fields if body.get(name) is not None]
        if not found:
            return
        if self._counter is not None:
            for name in found:
                self._counter.labels(name, self._action).inc()
        if self._action == "reject":
            first = found[0]
            raise InvalidRequest(f"the '{first}' parameter is not accepted", param=first)
        if not isinstance(body, MutableMapping):
            raise TypeError("a body whose fields are stripped must be mutable")
        for name in found:
            del body[name]
        log.info("request %s: stripped %s", request_id, ", ".join(found))


@dataclass(frozen=True)
class ImageRef:
    """Where one image part sits in the body, and the URL it names."""

    message: int
    part: int
    url: str

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}].image_url.url"


@dataclass(frozen=True)
class ChatParts:
    text: str
    images: tuple[ImageRef, ...]


def chat_parts(body: Mapping[str, Any]) -> ChatParts:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    texts: list[str] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest("each message must be an object", param=f"messages[{i}]")
        texts.extend(_tool_calls(message.get("tool_calls"), f"messages[{i}].tool_calls"))
        content = message.get("content")
        if content is None or isinstance(content, str):
            if content:
                texts.append(content)
            continue
        if not isinstance(content, list):
            raise InvalidRequest(
                "message content must be a string or an array of parts",
                param=f"messages[{i}].content",
            )
        for j, part in enumerate(content):
            _collect_part(part, i, j, texts, images)
    texts.extend(_tools(body.get("tools")))
    return ChatParts("\n".join(texts), tuple(images))


# Tool definitions and earlier calls are prompt text too: the chat template renders a tool's
# description and parameter schema, and a call's arguments, into what the model reads. Each is
# judged as a line of text; one the guard cannot read is refused rather than passed unjudged.
def _tools(tools: Any) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    lines = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest("each tool needs a 'function' with a 'name'", param=f"tools[{k}]")
        line = f"tool {function['name']}"
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise InvalidRequest(
                    "a tool's description must be a string", param=f"tools[{k}].function"
                )
            line += f": {description}"
        if function.get("parameters") is not None:
            line += " " + json.dumps(function["parameters"], ensure_ascii=False, sort_keys=True)
        lines.append(line)
    return lines


def _tool_calls(calls: Any, param: str) -> list[str]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise InvalidRequest("'tool_calls' must be an array", param=param)
    lines = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise InvalidRequest(
                "each tool call needs a 'function' with a string 'name' and 'arguments'",
                param=f"{param}[{k}]",
            )
        lines.append(f"call {name}({arguments})")
    return lines


def _collect_part(part: Any, i: int, j: int, texts: list[str], images: list[ImageRef]) -> None:
    param = f"messages[{i}].content[{j}]"
    if not isinstance(part, dict):
        raise InvalidRequest("each content part must be an object", param=param)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise InvalidRequest(f"{kind} part needs a string '{kind}'", param=f"{param}.{kind}")
        texts.append(text)
    elif kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if not isinstance(url, str) or not url:
            raise InvalidRequest(
                "image_url part needs an object with a string 'url'", param=f"{param}.image_url"
            )
        images.append(ImageRef(i, j, url))
    elif kind in UNCHECKABLE_PARTS:
        raise InvalidRequest(f"content parts of type '{kind}' are not accepted", param=param)
    else:
        raise InvalidRequest("unknown content part type", param=f"{param}.type")


def completion_text(body: Mapping[str, Any]) -> str:
    """The judged text of a legacy completions request (string or list of strings)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    # Token-id prompts cannot be judged as text, and vLLM's prompt_embeds never can.
    raise InvalidRequest("'prompt' must be a string or an array of strings", param="prompt")


def rewrite_images(
    body: Mapping[str, Any], refs: Sequence[ImageRef], urls: Sequence[str]
) -> dict[str, Any]:
    """A copy of ``body`` whose image parts name ``urls`` (the checked pixels) instead."""
    if len(refs) != len(urls):
        raise ValueError("one URL per image part is required")
    if not refs:
        return dict(body)
    out = dict(body)
    out["messages"] = copy.deepcopy(body["messages"])
    for ref, url in zip(refs, urls, strict=True):
        part = out["messages"][ref.message]["content"][ref.part]
        part["image_url"] = {**part["image_url"], "url": url}
    return out


def ordered(images: Sequence[ImageInput]) -> list[ImageInput]:
    return sorted(images, key=lambda im: im.index)
