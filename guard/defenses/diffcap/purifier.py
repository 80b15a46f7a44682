"""DiffCAP purification (DESIGN.md §4.1): noise each image until its embedding stops moving,
then denoise it back.

Every image is a chain that noises, checks every ``check_every`` steps and stops on its own
once the cosine similarity to its previous check reaches τ (t* = k) or at k_max = round(t_max·T),
then runs its reverse chain from t*. The chains advance in steps that share one UNet call and
one encoder call (``stepper``), so images that stop at different t* still batch, and a chain
that ends leaves at once.

Results never depend on the batch: every image draws its noise from its own generator, seeded
from the settings' seed and a hash of its (resized) pixels, and every operation works per
sample, so an image purified alone or beside others gives the same pixels (to float rounding)
and the same t*. A micro-batcher can therefore group requests freely.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from PIL import Image

from guard.defenses.diffcap.diffusion import NoiseSchedule
from guard.defenses.diffcap.encoders import Encoder
from guard.defenses.diffcap.settings import PurifySettings, Stop
from guard.defenses.diffcap.stepper import Chain, PurifyStepper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurifyResult:
    image: torch.Tensor  # (3, H, W) in [-1, 1], the input's size and device
    t_star: int  # noising steps taken; the reverse chain starts at diffusers timestep t* - 1
    # cos(φ(x_k), φ(x_{k-check_every})), one per check (from the floor's first check on)
    similarities: tuple[float, ...]
    stopped: Stop
    # cos(φ(x̂_0(x_k)), φ(x)), one per check, when the drift rule is on (drift_tau)
    drifts: tuple[float, ...]
    unet_evals: int  # the reverse chain's, plus one per embedding with signal="denoised"
    encoder_evals: int  # φ(x_0) (or φ at the check before the floor) plus one per check
    # cos(φ(x̂_0), φ(x)) at the look that confirmed (or overturned) a stop by τ; None: no look
    confirm_drift: float | None = None


@dataclass(frozen=True)
class Trace:
    """One image's checks from k_min (or the first check) to k_max, for calibration."""

    similarities: tuple[float, ...]  # cos(φ at check j, φ at check j - 1)
    drifts: tuple[float, ...]  # cos(φ(x̂_0) at check j, φ(x)); empty with signal="noisy"


class Purifier:
    """Batch purification with a loaded UNet, its noise schedule and an encoder φ."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: Any,  # a diffusers DDPM/DDIM scheduler, or a NoiseSchedule
        encoder: Encoder,
        settings: PurifySettings | None = None,
    ) -> None:
        self.unet = unet.eval()
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.encoder = encoder
        self.settings = settings or PurifySettings()
        T = self.schedule.num_train_timesteps
        self.k_max = round(self.settings.t_max * T)
        self.k_min = round(self.settings.t_min * T)
        escalate = self.settings.t_escalate
        self.k_escalate = self.k_max if escalate is None else round(escalate * T)
        if self.k_max < 1:
            raise ValueError(f"t_max={self.settings.t_max} of T={T} rounds to 0 noising steps")
        # The look that confirms a stop may reach k_max + confirm_steps; escalation noises on
        # from there, so it must not lie beyond the escalation depth.
        self.k_trace = self.k_max + self.settings.confirm_steps
        if self.settings.confirm_tau is not None and self.k_trace > self.k_escalate:
            raise ValueError(
                f"t_max·T + confirm_steps = {self.k_trace} must not exceed the escalation depth "
                f"{self.k_escalate} (raise t_escalate)"
            )
        size = self.settings.resolution or unet.config.sample_size
        self.resolution: tuple[int, int] = (
            (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )

    def stepper(self, *, stop: bool = True) -> PurifyStepper:
        """Chains of this purifier that advance one shared model call at a time."""
        return PurifyStepper(self, stop=stop)

    def purify_batch(self, images: Sequence[torch.Tensor]) -> list[PurifyResult]:
        """Purify images (3, H, W) in [-1, 1] of any sizes; one result per image, in order."""
        results = [chain_result(c) for c in _run(self.stepper(), images)]
        log.debug("purified %d images: t* %s", len(results), [r.t_star for r in results])
        return results

    def traces(self, images: Sequence[torch.Tensor]) -> list[Trace]:
        """Every check's similarity (and drift, with signal="denoised") up to k_max, and on to
        k_max + confirm_steps for the look that confirms a stop, with no stop and no denoising:
        what calibration works from."""
        chains = _run(self.stepper(stop=False), images)
        return [Trace(tuple(c.similarities), tuple(c.drifts)) for c in chains]

    def prepare(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The batch at model resolution, (B, 3, R, R), and one generator per image."""
        # Resize where each image lives; the per-image seed hashes the resized pixels.
        small = [_resize(img.float(), self.resolution) for img in images]  # (3, R, R) each
        generators = [torch.Generator().manual_seed(_seed(self.settings.seed, x)) for x in small]
        return torch.stack([x.to(self.unet.device) for x in small]), generators


def _run(stepper: PurifyStepper, images: Sequence[torch.Tensor]) -> list[Chain]:
    """Every image's chain, stepped to its end, in the images' order."""
    stepper.admit(range(len(images)), images)
    chains: dict[object, Chain] = {}
    while stepper.live:
        chains.update((c.key, c) for c in stepper.advance())
    return [chains[i] for i in range(len(images))]


def chain_result(chain: Chain) -> PurifyResult:
    """A finished chain's outcome, at the input's size and device."""
    return PurifyResult(
        image=_resize(chain.x.clamp(-1, 1), chain.size).clamp(-1, 1).to(chain.device),
        t_star=chain.t_star,
        similarities=tuple(chain.similarities),
        stopped=chain.stopped,
        drifts=tuple(chain.drifts),
        unet_evals=len(chain.timesteps) + chain.check_unet_evals,
        encoder_evals=chain.encoder_evals,
        confirm_drift=chain.confirm_drift,
    )


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(3, H, W) → (3, *size), bilinear with antialiasing for downscaling."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]


def _seed(seed: int, x: torch.Tensor) -> int:
    """A per-image seed from the settings' seed and the image's pixels, independent of the batch."""
    h = hashlib.sha256(str(seed).encode())
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → PIL RGB, rounded to the nearest 8-bit value."""
    array = tensor.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")
