"""How the guard asks a reasoner and reads its answer (DESIGN.md §4.3).

``reasoning-json``: the policy goes in the system prompt and the reasoner answers
``{"reasoning", "verdict": "safe"|"unsafe", "category"}``; the request carries a
``response_format`` JSON schema where the server supports structured outputs, and the parser
tolerates code fences and prose around the object otherwise. ``llama-guard``: Llama Guard 3
Vision / 4 style, whose chat template holds the (MLCommons) policy; the answer is ``safe`` or
``unsafe`` and a line of category codes (``S1,S10``).

Anything else — empty output, a refusal, prose without a verdict — raises
:class:`UnreadableVerdict`: the stage's fail mode decides, never a silent allow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guard.defenses.reasoning.policy import Policy

Protocol = Literal["reasoning-json", "llama-guard"]

# MLCommons hazard taxonomy codes (Llama Guard 3/4) → the guard's metric categories.
MLCOMMONS = {
    "S1": "violence",  # violent crimes
    "S2": "illegal_crimes",  # non-violent crimes
    "S3": "illegal_crimes",  # sex-related crimes
    "S4": "pornography",  # child sexual exploitation
    "S5": "other",  # defamation
    "S6": "dangerous_behavior",  # specialized advice
    "S7": "privacy",
    "S8": "illegal_crimes",  # intellectual property
    "S9": "dangerous_behavior",  # indiscriminate weapons
    "S10": "discrimination_stereotypes",  # hate
    "S11": "dangerous_behavior",  # suicide and self-harm
    "S12": "pornography",  # sexual content
    "S13": "political_controversies",  # elections
    "S14": "other",  # code interpreter abuse
}


class UnreadableVerdict(Exception):
    """The reasoner's output holds no verdict the guard can act on."""


@dataclass(frozen=True)
class Judgement:
    unsafe: bool
    category: str | None  # a policy category (reasoning-json) or a mapped MLCommons code
    reasoning: str  # the model's reasoning (reasoning-json) or its raw answer (llama-guard)
    codes: tuple[str, ...] = ()  # llama-guard's category codes as given


def system_prompt(policy: Policy) -> str:
    return (
        "You are a safety reasoner for a vision-language model. Judge whether the user's "
        "request - the image(s) and the text taken together - violates the policy below. An "
        "image and a text can each be harmless while their combination is not: reason about "
        "what the combination asks for before you decide.\n\nPolicy categories:\n"
        f"{policy.describe()}\n\n"
        'Answer with one JSON object only: {"reasoning": "<brief reasoning>", '
        '"verdict": "safe" or "unsafe", "category": "<one category name, or none>"}'
    )


def response_format(policy: Policy) -> dict[str, Any]:
    """OpenAI structured outputs (vLLM's guided decoding honours it)."""
    schema = {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string"},
            "verdict": {"type": "string", "enum": ["safe", "unsafe"]},
            "category": {"type": "string", "enum": [*policy.names, "none"]},
        },
        "required": ["reasoning", "verdict", "category"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "safety_verdict", "strict": True, "schema": schema},
    }


def build_body(
    protocol: Protocol,
    model: str,
    policy: Policy,
    image_urls: Sequence[str],
    text: str,
    *,
    structured: bool,
    max_tokens: int,
) -> dict[str, Any]:
    """The chat completion request for one (images, text) pair."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in image_urls
    ]
    content.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": max_tokens}
    if protocol == "reasoning-json":
        messages.insert(0, {"role": "system", "content": system_prompt(policy)})
        if structured:
            body["response_format"] = response_format(policy)
    body["messages"] = messages
    return body


def parse(protocol: Protocol, text: str, policy: Policy) -> Judgement:
    if protocol == "llama-guard":
        return parse_llama_guard(text)
    return parse_reasoning_json(text, policy)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_reasoning_json(text: str, policy: Policy) -> Judgement:
    """The first JSON object in ``text`` (fenced or not) with a safe/unsafe verdict."""
    if not text or not text.strip():
        raise UnreadableVerdict("empty output")
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    for candidate in candidates:
        obj = _first_object(candidate)
        if obj is None:
            continue
        verdict = str(obj.get("verdict", "")).strip().lower()
        if verdict not in ("safe", "unsafe"):
            raise UnreadableVerdict(f"verdict {verdict!r} is neither safe nor unsafe")
        raw = str(obj.get("category") or "").strip()
        category = None
        if verdict == "unsafe":  # a name outside the policy still blocks, as "other"
            known = raw in policy.names
            category = raw if known else ("unsafe" if raw in ("", "none") else "other")
        return Judgement(verdict == "unsafe", category, str(obj.get("reasoning", "")))
    raise UnreadableVerdict("no JSON object with a verdict")


def parse_llama_guard(text: str) -> Judgement:
    """``safe`` or ``unsafe`` on the first line, category codes (``S1,S10``) after it."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines or lines[0].lower() not in ("safe", "unsafe"):
        raise UnreadableVerdict("the first line is neither 'safe' nor 'unsafe'")
    if lines[0].lower() == "safe":
        return Judgement(False, None, text.strip())
    codes = tuple(c.strip().upper() for c in ",".join(lines[1:2]).split(",") if c.strip())
    category = MLCOMMONS.get(codes[0], "other") if codes else "unsafe"
    return Judgement(True, category, text.strip(), codes)


def _first_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None
