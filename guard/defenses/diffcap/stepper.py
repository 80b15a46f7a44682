"""DiffCAP one step at a time: every image is a chain that noises, checks and denoises on its
own schedule, and one step advances every live chain with at most one UNet call and one
encoder call for all of them (iteration-level batching).

Chains differ in length (t* differs per image, and an escalated image runs the longest chain
of all), so batching whole requests made a clean image wait for the deepest image beside it,
and new requests for the whole batch. Here a chain joins at any step and leaves as soon as it
is done; a :class:`guard.batching.BatchWorker` drives the stepper for the purify stage.

A chain's life (DESIGN.md §4.1): ``start`` embeds x at the step before the first check allowed
(k = 0 without a floor; the floor's noise is added on admission) and, where the drift rule
needs it, the input itself; ``noise`` adds the noise up to the next check; ``check`` embeds
x_k (or the UNet's x̂_0 from it) and stops, escalates or goes on; a stop by τ may first be
confirmed by a look ``confirm_steps`` further (x_k is held meanwhile; the chain noises on, one
more check, then escalates or returns to x_k); ``reverse`` takes one step of the reverse chain
per step. Every draw comes from the image's own generator, in the same order
whoever shares the step, so results do not depend on the company (to float rounding).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from guard.defenses.diffcap.diffusion import (
    next_timestep,
    noise_steps,
    padded_alphas,
    predict_x0,
    reverse_step,
    reverse_timesteps,
)
from guard.defenses.diffcap.settings import Stop

if TYPE_CHECKING:
    from guard.defenses.diffcap.purifier import Purifier

Phase = Literal["start", "noise", "check", "reverse", "done"]


@dataclass(eq=False)
class Chain:
    """One image's purification in progress (compared by identity)."""

    key: object
    size: tuple[int, int]  # the input's (H, W), restored at the end
    device: torch.device  # the input's
    x0: torch.Tensor  # (3, R, R) the input at model resolution
    x: torch.Tensor  # (3, R, R) x_k while noising, then the reverse chain's sample
    generator: torch.Generator
    k: int  # noising steps taken
    phase: Phase = "start"
    e_prev: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (D,) previous φ
    e_input: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (D,) φ(x)
    t_star: int = 0
    stopped: Stop = "t_max"
    similarities: list[float] = field(default_factory=list)
    drifts: list[float] = field(default_factory=list)
    encoder_evals: int = 0
    check_unet_evals: int = 0
    timesteps: list[int] = field(default_factory=list)  # the reverse chain, once noised
    position: int = 0  # the next entry of ``timesteps``
    # While a stop by τ is being confirmed: x_k and k where τ stopped it (the chain noises on).
    held: torch.Tensor | None = None  # (3, R, R)
    held_k: int = 0
    confirm_drift: float | None = None  # cos(φ(x̂_0), φ(x)) at the look, once taken


class PurifyStepper:
    """Live chains of one purifier. ``stop=False`` runs every check up to k_max with no stop,
    escalation or denoising (what calibration reads); the chains then end noised."""

    def __init__(self, purifier: Purifier, *, stop: bool = True) -> None:
        self.purifier = purifier
        self.stop = stop
        s = purifier.settings
        self.chains: list[Chain] = []
        # tau=None with stop: a fixed t* = k_max, no checks (DiffPure).
        self._checks = not (stop and s.tau is None)
        # No check below the floor can stop an image: noise straight to the check that
        # precedes the first one allowed to (checks fall on multiples of check_every).
        first = max(1, math.ceil(purifier.k_min / s.check_every)) * s.check_every
        self._k_start = min(first - s.check_every, purifier.k_max) if stop else 0
        # Calibration traces run on past k_max to where a look confirming a stop may reach.
        self._cap = purifier.k_max if stop else purifier.k_trace
        self._confirm = stop and s.confirm_tau is not None
        self._drift = s.signal == "denoised" and (
            s.drift_tau is not None or self._confirm or not stop
        )
        self._alphas = padded_alphas(purifier.schedule, purifier.unet.device)  # (T+1,)

    @property
    def live(self) -> int:
        return len(self.chains)

    def admit(self, keys: Sequence[object], images: Sequence[torch.Tensor]) -> None:
        """Start a chain per image (3, H, W) in [-1, 1]; all or none (bad input raises)."""
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(
                    f"image {i}: expected a float (3, H, W) tensor, got "
                    f"{image.dtype} {tuple(image.shape)}"
                )
        if not images:
            return
        p = self.purifier
        k = self._k_start if self._checks else p.k_max
        with torch.inference_mode():
            x0, generators = p.prepare(images)  # (B, 3, R, R)
            x = noise_steps(x0, p.schedule, 0, k, generators)  # (B, 3, R, R)
        chains = [
            Chain(key, (int(im.shape[-2]), int(im.shape[-1])), im.device, x0[i], x[i], g, k)
            for i, (key, im, g) in enumerate(zip(keys, images, generators, strict=True))
        ]
        if not self._checks:
            for chain in chains:
                self._denoise_from(chain, p.k_max, "t_max")
        self.chains += chains

    def advance(self) -> list[Chain]:
        """One step for every live chain; returns (and drops) the chains it finished."""
        with torch.inference_mode():
            self._noise([c for c in self.chains if c.phase == "noise"])
            embedding = [c for c in self.chains if c.phase in ("start", "check")]
            reversing = [c for c in self.chains if c.phase == "reverse"]
            self._embed(embedding, self._unet(embedding, reversing))
        done = [c for c in self.chains if c.phase == "done"]
        self.chains = [c for c in self.chains if c.phase != "done"]
        return done

    def drop(self, keys: list[object]) -> None:
        """Forget the chains of these keys (nobody waits for them any more)."""
        gone = set(keys)
        self.chains = [c for c in self.chains if c.key not in gone]

    def abandon(self) -> None:
        self.chains = []

    # -- one step's parts --------------------------------------------------------------------

    def _noise(self, chains: list[Chain]) -> None:
        """Noise up to each chain's next check (for a held stop: its confirming look); a chain
        whose cap falls between two checks has reached it without a check there."""
        p, s = self.purifier, self.purifier.settings
        every = s.check_every

        def target(c: Chain) -> tuple[int, int]:
            if c.held is not None:
                return c.k, c.held_k + s.confirm_steps
            return c.k, min(c.k + every, self._cap)

        for (k, until), group in itertools.groupby(sorted(chains, key=target), key=target):
            members = list(group)
            x = noise_steps(
                torch.stack([c.x for c in members]),
                p.schedule,
                k,
                until,
                [c.generator for c in members],
            )  # (A, 3, R, R)
            for chain, xk in zip(members, x, strict=True):
                chain.x, chain.k = xk, until
                if until % every:
                    self._capped(chain)
                else:
                    chain.phase = "check"

    def _unet(self, embedding: list[Chain], reversing: list[Chain]) -> dict[int, torch.Tensor]:
        """One UNet call: x̂_0 for the chains about to be embedded (signal="denoised"), one
        reverse step for the rest. Returns the x̂_0 views by chain id."""
        p = self.purifier
        estimating = [c for c in embedding if p.settings.signal == "denoised" and c.k > 0]
        rows = estimating + reversing
        if not rows:
            return {}
        n = len(estimating)
        x = torch.stack([c.x for c in rows])  # (A, 3, R, R)
        t_now = torch.tensor(
            [c.k - 1 for c in estimating] + [c.timesteps[c.position] for c in reversing],
            device=x.device,
        )  # (A,): after k noising steps, diffusers timestep k - 1
        out = p.unet(x.to(p.unet.dtype), t_now).sample.float()  # (A, 3, R, R)
        views: dict[int, torch.Tensor] = {}
        if estimating:
            a = self._alphas[t_now[:n]].view(-1, 1, 1, 1)  # (n, 1, 1, 1)
            x0_hat = predict_x0(p.schedule, out[:n], x[:n], a)  # (n, 3, R, R)
            for chain, view in zip(estimating, x0_hat, strict=True):
                views[id(chain)] = view
                chain.check_unet_evals += 1
        if reversing:
            s = p.settings
            t_next = torch.tensor(
                [next_timestep(c.timesteps, c.position, s.sampler) for c in reversing],
                device=x.device,
            )  # (R,), -1 for x_0
            stepped = reverse_step(
                p.schedule,
                self._alphas,
                out[n:],
                x[n:],
                t_now[n:],
                t_next,
                s.sampler,
                [c.generator for c in reversing],
            )  # (R, 3, R, R)
            for chain, xs in zip(reversing, stepped, strict=True):
                chain.x = xs
                chain.position += 1
                if chain.position == len(chain.timesteps):
                    chain.phase = "done"
        return views

    def _embed(self, chains: list[Chain], views: dict[int, torch.Tensor]) -> None:
        """One encoder call: each chain's view, and φ(x) for chains starting under a floor
        that the drift rule compares with."""
        if not chains:
            return
        p = self.purifier
        inputs = [c for c in chains if c.phase == "start" and self._drift and c.k > 0]
        batch = [views.get(id(c), c.x) for c in chains] + [c.x0 for c in inputs]
        e = p.encoder.embed(torch.stack(batch)).to(chains[0].x.device)  # (A + I, D)
        for chain in chains:
            chain.encoder_evals += 1
        for chain, e_input in zip(inputs, e[len(chains) :], strict=True):
            chain.e_input = e_input
            chain.encoder_evals += 1
        checking = [(j, c) for j, c in enumerate(chains) if c.phase == "check"]
        for j, chain in enumerate(chains):
            if chain.phase == "start":
                chain.e_prev = e[j]
                if self._drift and chain.k == 0:
                    chain.e_input = e[j].clone()  # φ(x_0) is φ(x): no second call
                chain.phase = "noise"
                if chain.k >= self._cap:
                    self._capped(chain)
        if checking:
            rows = torch.tensor([j for j, _ in checking], device=e.device)
            self._decide([c for _, c in checking], e[rows])

    def _decide(self, chains: list[Chain], e: torch.Tensor) -> None:
        """Each check's similarity to the previous one and drift from the input, and what
        follows: escalate (drift below drift_tau), stop (similarity ≥ τ) or noise on."""
        s = self.purifier.settings
        previous = torch.stack([c.e_prev for c in chains])  # (A, D)
        cos = F.cosine_similarity(e, previous, dim=-1).tolist()  # (A,)
        drift = [math.nan] * len(chains)
        if self._drift:
            inputs = torch.stack([c.e_input for c in chains])  # (A, D)
            drift = F.cosine_similarity(e, inputs, dim=-1).tolist()  # (A,)
        for chain, ej, c, d in zip(chains, e, cos, drift, strict=True):
            if chain.held is not None:
                self._confirmed(chain, d)
                continue
            chain.e_prev = ej
            chain.similarities.append(float(c))
            if self._drift:
                chain.drifts.append(float(d))
            if self.stop and s.drift_tau is not None and d < s.drift_tau:
                self._denoise_from(chain, self.purifier.k_escalate, "escalated")
            elif self.stop and s.tau is not None and c >= s.tau:
                if self._confirm:
                    chain.held, chain.held_k, chain.phase = chain.x, chain.k, "noise"
                else:
                    self._denoise_from(chain, chain.k, "tau")
            elif chain.k >= self._cap:
                self._capped(chain)
            else:
                chain.phase = "noise"

    def _confirmed(self, chain: Chain, drift: float) -> None:
        """The look after a stop by τ: escalate if the estimate has drifted from the input,
        else denoise from where τ stopped the chain."""
        assert chain.held is not None and self.purifier.settings.confirm_tau is not None
        chain.confirm_drift = drift
        if drift < self.purifier.settings.confirm_tau:
            chain.held = None
            self._denoise_from(chain, self.purifier.k_escalate, "escalated")
        else:
            chain.x, chain.k, chain.held = chain.held, chain.held_k, None
            self._denoise_from(chain, chain.k, "tau")

    def _capped(self, chain: Chain) -> None:
        """At k_max without a stop: sent on to k_escalate where that is deeper. Without
        ``stop`` the chain's checks are all done: it leaves noised."""
        p = self.purifier
        if not self.stop:
            chain.phase = "done"
        elif p.k_escalate > p.k_max:
            self._denoise_from(chain, p.k_escalate, "escalated")
        else:
            self._denoise_from(chain, p.k_max, "t_max")

    def _denoise_from(self, chain: Chain, t_star: int, stopped: Stop) -> None:
        """Noise on to t_star (escalation goes on from where the chain stopped), then reverse."""
        p, s = self.purifier, self.purifier.settings
        if t_star > chain.k:
            chain.x = noise_steps(chain.x[None], p.schedule, chain.k, t_star, [chain.generator])[0]
            chain.k = t_star
        chain.t_star, chain.stopped = t_star, stopped
        # After t* noising steps the sample sits at diffusers timestep t* - 1.
        chain.timesteps = reverse_timesteps(t_star - 1, s.sampler, s.ddim_steps)
        chain.position, chain.phase = 0, "reverse"
