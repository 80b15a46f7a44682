"""The ``reasoner`` stage: a cross-modal safety reasoner judges the (purified images, user text)
pair behind an OpenAI-compatible endpoint (DESIGN.md §4.3; SRPO/SSUI).

The reasoner may be the upstream itself (a LoRA adapter, say) or any other server; it gets the
purified pixels as PNG ``data:`` URLs, never the client's URLs. Calls are bounded (a
semaphore) and cached by (image digests, text digest, policy version, model, protocol). With
``structured_output: auto`` the first call asks for a JSON schema and, if the server refuses
the field (400), the stage stops asking and parses tolerantly. A reply without a readable
verdict, a server error or a timeout raises: the pipeline's fail mode decides.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import httpx

from guard.cache import ByteLRU
from guard.config import ConfigError, ReasonerConfig
from guard.defenses.reasoning.policy import Policy, load_policy
from guard.defenses.reasoning.protocols import (
    Judgement,
    UnreadableVerdict,
    build_body,
    parse,
)
from guard.intake.decode import to_png_data_url
from guard.metrics import Metrics
from guard.types import Decision, GuardRequest

log = logging.getLogger(__name__)
NAME = "reasoner"
EXCERPT = 240  # characters of reasoning kept in the decision (and so in the audit log)


class ReasonerError(Exception):
    """The reasoner could not give a usable verdict (the pipeline's fail mode applies)."""


class ReasonerStage:
    name = NAME
    may_rewrite = False

    def __init__(
        self,
        cfg: ReasonerConfig,
        policy: Policy | None = None,
        *,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if cfg.model is None:
            raise ConfigError("reasoner.model must name the reasoner's model on its server")
        self.cfg = cfg
        self.policy = policy or load_policy(cfg.policy)
        self._metrics = metrics
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self._cache: ByteLRU[Judgement] = ByteLRU(cfg.cache_bytes)
        self._structured = cfg.structured_output != "never"

    @classmethod
    def from_config(cls, cfg: ReasonerConfig, metrics: Metrics | None = None) -> ReasonerStage:
        return cls(cfg, metrics=metrics)

    async def check(self, request: GuardRequest) -> Decision:
        key = self._key(request)
        judgement = self._cache.get(key)
        cached = judgement is not None
        if judgement is None:
            async with self._limit:
                judgement = await self._ask(request)
            self._cache.put(key, judgement, 512 + len(judgement.reasoning))
        elif self._metrics is not None:
            self._metrics.cache_hits.labels(NAME).inc()
        details = {
            "model": self.cfg.model,
            "protocol": self.cfg.protocol,
            "policy": self.policy.version,
            "reasoning": judgement.reasoning[:EXCERPT],
            "codes": list(judgement.codes),
            "cached": cached,
        }
        if judgement.unsafe:
            return Decision(
                NAME,
                "block",
                reason=f"the reasoner judged the request unsafe ({judgement.category})",
                category=judgement.category,
                details=details,
            )
        return Decision(NAME, "allow", reason="judged safe", details=details)

    def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _ask(self, request: GuardRequest) -> Judgement:
        urls = await asyncio.to_thread(lambda: [to_png_data_url(im.image) for im in request.images])
        for attempt in range(2):
            body = build_body(
                self.cfg.protocol,
                self.cfg.model or "",
                self.policy,
                urls,
                request.text,
                structured=self._structured and self.cfg.protocol == "reasoning-json",
                max_tokens=self.cfg.max_tokens,
            )
            response = await self._post(body)
            refused = response.status_code == 400 and "response_format" in response.text
            if refused and self.cfg.structured_output == "auto" and attempt == 0:
                log.warning("reasoner %s refuses response_format: parsing freely", self.cfg.model)
                self._structured = False
                continue
            break
        if response.status_code != 200:
            raise ReasonerError(f"the reasoner answered HTTP {response.status_code}")
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise ReasonerError("the reasoner's reply is not a chat completion") from None
        try:
            return parse(self.cfg.protocol, text, self.policy)
        except UnreadableVerdict as e:
            log.warning("reasoner %s: unreadable verdict (%s)", self.cfg.model, e)
            raise ReasonerError("the reasoner's answer holds no verdict") from None

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._http().post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise ReasonerError("the reasoner timed out") from None
        except httpx.HTTPError as e:
            raise ReasonerError(f"the reasoner is unreachable ({type(e).__name__})") from None

    def _http(self) -> httpx.AsyncClient:
        # Created on first use: the client belongs to the running event loop.
        if self._client is None:
            headers = {}
            if self.cfg.api_key is not None:
                headers["Authorization"] = f"Bearer {self.cfg.api_key.get_secret_value()}"
            self._client = httpx.AsyncClient(
                base_url=str(self.cfg.url).rstrip("/"),
                headers=headers,
                timeout=self.cfg.timeout_s,
                transport=self._transport,
            )
        return self._client

    def _key(self, request: GuardRequest) -> tuple[str, ...]:
        text = hashlib.sha256(request.text.encode()).hexdigest()
        images = ",".join(im.digest for im in request.images)
        return (images, text, self.policy.version, self.cfg.model or "", self.cfg.protocol)
