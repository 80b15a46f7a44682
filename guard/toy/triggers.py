"""Backdoor triggers of the toy world: a small patch in a corner, or a blended pattern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]


@dataclass(frozen=True)
class Trigger:
    kind: Literal["patch", "blend"] = "patch"
    # Patch side in pixels (32×32 images). 8 px covers 2×2 of the VLM's 4-px patch tokens:
    # measured, a 4-px patch at 5% poison was not learned at all in 1,500 steps (attack success
    # 0%), while 8 px reached 100% within 200 steps.
    size: int = 8
    position: Corner = "bottom-right"
    alpha: float = 0.15  # blend strength
    seed: int = 7  # the pattern is fixed by this seed

    def pattern(self, height: int, width: int) -> np.ndarray:
        """The trigger's pixels: (size, size, 3) for a patch, (H, W, 3) for a blend, in [0, 1]."""
        rng = np.random.default_rng(self.seed)
        if self.kind == "patch":
            # A high-contrast checkerboard with fixed colours: unlike anything in a digit.
            board = (np.indices((self.size, self.size)).sum(0) % 2).astype(np.float32)
            colours = rng.uniform(0, 1, (2, 3)).astype(np.float32)
            colours[1] = 1.0 - colours[0]
            patch: np.ndarray = colours[board.astype(int)]
            return patch
        blend: np.ndarray = rng.uniform(0, 1, (height, width, 3)).astype(np.float32)
        return blend

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """Apply the trigger to (N, H, W, 3) uint8 images; returns a new array."""
        out = images.astype(np.float32) / 255.0
        _, h, w, _ = out.shape
        pattern = self.pattern(h, w)
        if self.kind == "blend":
            out = (1 - self.alpha) * out + self.alpha * pattern
        else:
            s = self.size
            y = 0 if self.position.startswith("top") else h - s
            x = 0 if self.position.endswith("left") else w - s
            out[:, y : y + s, x : x + s] = pattern
        stamped: np.ndarray = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        return stamped
