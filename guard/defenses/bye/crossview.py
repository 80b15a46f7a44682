"""Cross-view invariance (DESIGN.md §4.2): a backdoored answer barely moves when non-semantic
patches of the image are masked, while a clean answer shifts a little.

For each image, K views each mask a random ``fraction`` of the vision tower's patch grid with
the image's mean colour; the score is the mean Jensen–Shannon divergence (nats) between the
original's and each view's next-token distributions along the original's greedy answer: its
first ``answer_tokens`` positions, teacher-forced (1: the first answer token only). More than
one position matters where answers share an opening ("The digit is …" in the toy world).
Views are seeded from the image's pixels, so a score does not depend on its batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from guard.defenses.bye.probe import EntropyProbe, Prefill


@dataclass(frozen=True)
class ViewSettings:
    views: int = 4  # K
    fraction: float = 0.2  # share of patches masked per view (DESIGN.md: 10–25%)
    answer_tokens: int = 1  # answer positions compared (greedy answer of the original)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.answer_tokens < 1:
            raise ValueError(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")


def patch_views(image: Image.Image, grid: int, settings: ViewSettings) -> list[Image.Image]:
    """K copies of ``image`` with ⌈fraction·grid²⌉ of its grid×grid patches masked."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    h, w, _ = array.shape
    rng = np.random.default_rng(_seed(settings.seed, array))
    fill = array.reshape(-1, 3).mean(0).round().astype(np.uint8)
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    count = max(1, math.ceil(settings.fraction * grid * grid))
    views = []
    for _ in range(settings.views):
        view = array.copy()
        for cell in rng.choice(grid * grid, size=count, replace=False):
            r, c = divmod(int(cell), grid)
            view[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = fill
        views.append(Image.fromarray(view, "RGB"))
    return views


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """JS(p‖q) in nats for rows of log-probabilities (…, V); in [0, ln 2]."""
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0)


class CrossView:
    """Mean JS divergence of the next-token distribution under K patch-masked views."""

    def __init__(self, probe: EntropyProbe, settings: ViewSettings | None = None) -> None:
        self.probe = probe
        self.settings = settings or ViewSettings()
        vision = probe.model.config.vision_config
        self.grid = int(vision.image_size) // int(vision.patch_size)

    @torch.inference_mode()
    def divergences(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        originals: Prefill | None = None,
    ) -> torch.Tensor:
        """(B,) mean JS divergence per image: one greedy answer of the originals, then one
        teacher-forced prefill of B·(K+1) rows. ``originals``: the probe's batch of these
        images and prompts, when the caller already prepared it."""
        k, n = self.settings.views, self.settings.answer_tokens
        originals = originals or self.probe.prepare(images, prompts)
        answer, valid = self._answers(originals, n)  # (B, n) each
        rows: list[Image.Image] = []
        texts: list[str] = []
        for image, prompt in zip(images, prompts, strict=True):
            rows += [image, *patch_views(image, self.grid, self.settings)]
            texts += [prompt] * (k + 1)
        batch = self.probe.prepare(rows, texts)
        forced = answer.repeat_interleave(k + 1, dim=0)  # (B·(K+1), n)
        log_probs = self._forced_log_probs(batch, forced)  # (B·(K+1), n, V)
        grouped = log_probs.view(len(images), k + 1, n, -1)  # (B, K+1, n, V)
        original = grouped[:, :1].expand(-1, k, -1, -1)  # (B, K, n, V)
        js = js_divergence(original, grouped[:, 1:]).mean(1)  # (B, n)
        weights = valid.float()
        return (js * weights).sum(1) / weights.sum(1)  # (B,)

    def _answers(self, batch: Prefill, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The originals' greedy answers (B, n) and which positions count: up to and including
        the end-of-sequence token (the first position always counts)."""
        model = self.probe.model
        prompt_len = batch.inputs["input_ids"].shape[1]
        generated = model.generate(**batch.inputs, max_new_tokens=n, do_sample=False)
        answer = generated[:, prompt_len:]  # (B, ≤ n): generation may stop early for all rows
        eos = model.generation_config.eos_token_id
        pad = model.generation_config.pad_token_id
        filler = pad if pad is not None else (eos if isinstance(eos, int) else 0)
        if answer.shape[1] < n:
            tail = torch.full((answer.shape[0], n - answer.shape[1]), int(filler))
            answer = torch.cat([answer, tail.to(answer.device)], dim=1)
        ends = torch.zeros_like(answer, dtype=torch.bool)
        for token in [eos] if isinstance(eos, int) else list(eos or []):
            ends |= answer == token
        # A position counts while no end-of-sequence came before it.
        before = torch.cumsum(ends.long(), dim=1) - ends.long()  # ends strictly before
        return answer.cpu(), (before == 0).cpu()

    def _forced_log_probs(self, batch: Prefill, answer: torch.Tensor) -> torch.Tensor:
        """(R, n, V) log-probabilities of answer positions 0..n-1, teacher-forced."""
        n = answer.shape[1]
        inputs = dict(batch.inputs)
        device = inputs["input_ids"].device
        given = answer[:, : n - 1].to(device)  # position i predicts answer[i]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], given], dim=1)
        ones = torch.ones_like(given, dtype=inputs["attention_mask"].dtype)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
        out = self.probe.model(**inputs, use_cache=False, logits_to_keep=n)
        return torch.log_softmax(out.logits.float(), dim=-1).cpu()  # (R, n, V)


def _seed(seed: int, pixels: np.ndarray) -> int:
    h = hashlib.sha256(str(seed).encode())
    h.update(str(pixels.shape).encode())
    h.update(pixels.tobytes())
    return int.from_bytes(h.digest()[:8], "little")
