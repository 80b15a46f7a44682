"""DiffCAP's settings: the stop rule, its bounds, the check signal and the reverse sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from guard.defenses.diffcap.diffusion import Sampler

# Why an image stopped noising: its similarity reached τ, it hit the cap, or it was sent deeper.
Stop = Literal["tau", "t_max", "escalated"]
Signal = Literal["noisy", "denoised"]


@dataclass(frozen=True)
class PurifySettings:
    # A cosine threshold in [-1, 1]. Small encoders sit above 0.99 from the first steps, so
    # useful values are close to 1; calibrate on clean images. None turns the adaptive stop off:
    # every image is noised to k_max with no encoder calls (DiffPure with a fixed t*).
    tau: float | None = 0.999
    check_every: int = 5  # noising steps between two encoder checks
    t_max: float = 0.3  # cap on t* as a fraction of the T training timesteps
    # Floor on t*, a fraction of T: the stop rule may not fire before it. Where an encoder's
    # similarity does not tell attacked images from clean ones (the toy world's tower), the
    # floor is what drowns the perturbation; the rule still adds noise where it says so.
    t_min: float = 0.0
    # What the encoder embeds at a check: the noisy image x_k (DiffCAP), or the UNet's estimate
    # of the clean image x̂_0(x_k) (one more UNet call per check). Probed on the toy world,
    # the x̂_0 embedding moves while the denoiser strips a PGD perturbation and stays put for
    # clean images, where the noisy image's embedding moves alike for both.
    signal: Signal = "noisy"
    # Where an image still moving at t_max goes (a fraction of T, ≥ t_max; None: stays at
    # t_max). With a short t_max this turns "not settled like a clean image" into a deep
    # purification for the few images it concerns, while settled ones stay shallow.
    t_escalate: float | None = None
    # Escalate, at any check, an image whose x̂_0 estimate has drifted from the input itself:
    # cos(φ(x̂_0(x_k)), φ(x)) < drift_tau sends it to k_escalate at once. The stop rule alone
    # lets through attacked images whose estimate settles early, but settles away from the
    # input; clean estimates stay close to it. Needs signal="denoised"; calibrate it too.
    drift_tau: float | None = None
    # A stop by τ must hold one look further: the image is noised on ``confirm_steps`` more
    # (a multiple of check_every), and if the x̂_0 estimate there has drifted from the input
    # below ``confirm_tau`` it escalates; otherwise it denoises from where τ stopped it (x_k is
    # kept aside). On the toy world some attacked estimates still look like the input 5 steps
    # in but not 15: the look costs one UNet and one encoder call per stopped image, and no
    # reverse steps. confirm_tau None turns it off; calibration traces still run confirm_steps
    # past k_max, so that confirm_tau can be calibrated. Needs signal="denoised".
    confirm_steps: int = 0
    confirm_tau: float | None = None
    sampler: Sampler = "ddim"
    ddim_steps: int = 10  # the main cost knob: UNet evaluations per image ≤ ddim_steps
    seed: int = 0
    resolution: int | None = None  # None: the UNet's sample_size

    def __post_init__(self) -> None:
        if self.tau is not None and not (math.isfinite(self.tau) and -1 <= self.tau <= 1):
            raise ValueError(
                f"tau must be a cosine threshold in [-1, 1] (or None for a fixed t*), "
                f"got {self.tau}"
            )
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1 noising step, got {self.check_every}")
        if not (math.isfinite(self.t_max) and 0 < self.t_max <= 1):
            raise ValueError(f"t_max must be a fraction of T in (0, 1], got {self.t_max}")
        if not (math.isfinite(self.t_min) and 0 <= self.t_min <= self.t_max):
            raise ValueError(f"t_min must be in [0, t_max={self.t_max}], got {self.t_min}")
        if self.t_escalate is not None and not (
            math.isfinite(self.t_escalate) and self.t_max <= self.t_escalate <= 1
        ):
            raise ValueError(
                f"t_escalate must be in [t_max={self.t_max}, 1] (or None), got {self.t_escalate}"
            )
        if self.drift_tau is not None:
            if not (math.isfinite(self.drift_tau) and -1 <= self.drift_tau <= 1):
                raise ValueError(f"drift_tau must be a cosine in [-1, 1], got {self.drift_tau}")
            if self.signal != "denoised":
                raise ValueError("drift_tau needs signal='denoised' (x_k drifts for every image)")
        if self.confirm_steps < 0 or self.confirm_steps % self.check_every:
            raise ValueError(
                f"confirm_steps must be a multiple of check_every={self.check_every} (0: off), "
                f"got {self.confirm_steps}"
            )
        if self.confirm_tau is not None:
            if self.confirm_steps == 0:
                raise ValueError("confirm_tau needs confirm_steps > 0 (how far to look)")
            if not (math.isfinite(self.confirm_tau) and -1 <= self.confirm_tau <= 1):
                raise ValueError(f"confirm_tau must be a cosine in [-1, 1], got {self.confirm_tau}")
            if self.signal != "denoised" or self.tau is None:
                raise ValueError("confirm_tau needs signal='denoised' and a stop rule (tau)")
        if self.signal not in ("noisy", "denoised"):
            raise ValueError(f"signal must be 'noisy' or 'denoised', got {self.signal!r}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {self.ddim_steps}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(
                f"resolution must be a positive number of pixels, got {self.resolution}"
            )
