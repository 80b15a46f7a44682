"""DiffCAP purification: adaptive-depth diffusion purification of images (DESIGN.md §4.1).

The model-side core, plain synchronous torch: embedding backends (``encoders``), diffusion
loading and per-sample reverse sampling (``diffusion``), the stop rule's settings
(``settings``), the batch purifier (``purifier``) stepping each image's chain (``stepper``),
its calibration (``profile``) and the purifier a guard config names (``loading``).
"""

from guard.defenses.diffcap.diffusion import (
    NoiseSchedule,
    Sampler,
    denoise,
    load_diffusion,
    noise_steps,
    noise_to,
    reverse,
    reverse_timesteps,
    unet_evaluations,
)
from guard.defenses.diffcap.encoders import (
    Encoder,
    HFVisionEncoder,
    OpenClipEncoder,
    load_encoder,
)
from guard.defenses.diffcap.purifier import (
    Purifier,
    PurifyResult,
    Trace,
    pil_to_tensor,
    tensor_to_pil,
)
from guard.defenses.diffcap.settings import PurifySettings, Signal, Stop

__all__ = [
    "Encoder",
    "HFVisionEncoder",
    "NoiseSchedule",
    "OpenClipEncoder",
    "Purifier",
    "PurifyResult",
    "PurifySettings",
    "Sampler",
    "Signal",
    "Stop",
    "Trace",
    "denoise",
    "load_diffusion",
    "load_encoder",
    "noise_steps",
    "noise_to",
    "pil_to_tensor",
    "reverse",
    "reverse_timesteps",
    "tensor_to_pil",
    "unet_evaluations",
]
