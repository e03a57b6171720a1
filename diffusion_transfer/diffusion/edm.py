"""EDM (Karras et al. 2022) in σ-space: preconditioning, the training loss, and the Heun / Euler samplers.

Spec: ``papers/edm.md`` 2.1-2.3 and 3.3. A net F is wrapped into the denoiser

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)),      score ∇log p(x; σ) = (D(x; σ) - x) / σ²

============  ===============  =================  ===============  ===============  ==================================
precond       c_skip           c_out              c_in             c_noise          training σ, loss weight λ(σ)
============  ===============  =================  ===============  ===============  ==================================
EDM           σ_d²/(σ²+σ_d²)   σ σ_d/√(σ²+σ_d²)   1/√(σ²+σ_d²)     ¼ ln σ           ln σ ~ N(P_mean, P_std²), 1/c_out²
VP            1                -σ                 1/√(σ²+1)        (M-1) t(σ)       t ~ U(ε_t, 1), σ = σ(t); 1/σ²
VE            1                σ                  1                ln(σ/2)          ln σ ~ U(ln σ_lo, ln σ_hi); 1/σ²
============  ===============  =================  ===============  ===============  ==================================

with VP's σ(t) = √(exp(½β_d t² + β_min t) - 1). Sampling integrates the probability-flow ODE
dx/dσ = (x - D(x; σ))/σ on the grid σ_i = (σ_max^{1/ρ} + i/(N-1)(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, σ_N = 0, with Heun's
method (the last step, to σ = 0, stays Euler: 2N - 1 evaluations) and optional churn (EDM Algorithm 2).

Nets are plain callables ``net(x, c_noise [B], class_labels, augment_labels)``; samplers take a denoiser
``denoiser(x [B, ...] float32, σ [B] float32) -> D`` so guidance is a wrapper (see
:func:`diffusion_transfer.diffusion.guidance.apply_guidance`). No weights and no Lightning here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, Generators

__all__ = ["EDM", "PRECONDS", "Denoiser", "EDMPrecond", "Precond", "VEPrecond", "VPPrecond", "make_precond"]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x [B, C, ...] float32, sigma [B] float32) -> D(x; σ)`` with x's shape."""


# ------------------------------------------------------------------------------------------------------------
# Preconditionings (EDM's XPrecond with the σ law and weight of its XLoss)
# ------------------------------------------------------------------------------------------------------------
class Precond(ABC):
    """A preconditioning (c_skip, c_out, c_in, c_noise) with its training σ law and loss weight.

    Subclasses define ``sigma_min`` / ``sigma_max``: the σ range the network supports (sampling grids are
    clipped to it).
    """

    name: str
    sigma_min: float
    sigma_max: float

    @abstractmethod
    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each with sigma's shape."""

    @abstractmethod
    def sample_sigma(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """n training noise levels [n] from torch's global RNG."""

    @abstractmethod
    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ), with sigma's shape."""


@dataclass(frozen=True)
class EDMPrecond(Precond):
    """EDM's preconditioning (unit-variance net inputs and targets for data of std ``sigma_data``).

    Args:
        sigma_data: σ_d, the data standard deviation (0.5 for images in [-1, 1]).
        P_mean / P_std: ln σ ~ N(P_mean, P_std²) during training (-1.2, 1.2).
        sigma_min / sigma_max: supported range (EDM: 0 and ∞).
    """

    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    name = "edm"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        total = sigma**2 + self.sigma_data**2
        return self.sigma_data**2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def sample_sigma(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return (torch.randn(n, device=device) * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        # = 1 / c_out²: the effective training target F* then has unit variance at every σ.
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@dataclass(frozen=True)
class VPPrecond(Precond):
    """Variance-preserving preconditioning (DDPM++ "VP" of Song et al. 2021) in EDM's form.

    Args:
        beta_d / beta_min: the linear β(t) = β_min + β_d t (19.9, 0.1). M: the net's timestep scale (1000).
        epsilon_t: the smallest training t (1e-5).
    """

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5
    name = "vp"

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) = √(exp(½β_d t² + β_min t) - 1)."""
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) - β_min) / β_d."""
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    @property
    def sigma_min(self) -> float:  # type: ignore[override]
        return float(self.sigma(torch.tensor(self.epsilon_t, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:  # type: ignore[override]
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sample_sigma(self, n: int, device: torch.device | str | None = None) -> Tensor:
        t = 1 + torch.rand(n, device=device) * (self.epsilon_t - 1)
        return self.sigma(t)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return sigma**-2


@dataclass(frozen=True)
class VEPrecond(Precond):
    """Variance-exploding preconditioning (NCSN++ "VE" of Song et al. 2021) in EDM's form.

    Args:
        sigma_min / sigma_max: training and supported range (0.02, 100).
    """

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    name = "ve"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()

    def sample_sigma(self, n: int, device: torch.device | str | None = None) -> Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + torch.rand(n, device=device) * (hi - lo)).exp()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return sigma**-2


PRECONDS: dict[str, type[Precond]] = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


def make_precond(name: str, **kwargs: Any) -> Precond:
    """A preconditioning by name (``edm``, ``vp``, ``ve``); kwargs are its constants."""
    if name not in PRECONDS:
        raise ValueError(f"unknown preconditioning {name!r}; choose one of {', '.join(PRECONDS)}")
    return PRECONDS[name](**kwargs)


# ------------------------------------------------------------------------------------------------------------
# The process
# ------------------------------------------------------------------------------------------------------------
class EDM:
    """EDM process: denoiser, loss and samplers around a :class:`Precond` (no weights).

    Args:
        precond: a :class:`Precond` or its name (``edm``, ``vp``, ``ve``); ``**precond_kwargs`` are its
            constants (e.g. ``sigma_data=0.5, P_mean=-1.2, P_std=1.2``).
        sigma_min / sigma_max: ends of the sampling grid (0.002, 80), clipped to the precond's range.
        rho: grid curvature ρ (7).
    """

    def __init__(self, precond: Precond | str = "edm", *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, **precond_kwargs: Any) -> None:
        if isinstance(precond, str):
            precond = make_precond(precond, **precond_kwargs)
        elif precond_kwargs:
            raise TypeError("precond constants are given with a precond name, not with a Precond object")
        self.precond = precond
        self.sigma_min = max(sigma_min, precond.sigma_min)
        self.sigma_max = min(sigma_max, precond.sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"empty sampling range [{self.sigma_min}, {self.sigma_max}]")
        self.rho = rho

    def __repr__(self) -> str:
        return f"EDM(precond={self.precond!r}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"

    # ---------------------------------------------------------------------------------- denoiser and loss

    def denoise(self, net: Callable[..., Tensor], x: Tensor, sigma: Tensor | float,
                class_labels: Tensor | None = None, augment_labels: Tensor | None = None) -> Tensor:
        """D(x; σ) = c_skip x + c_out F(c_in x; c_noise), computed in float32 like EDM's precond.

        Args:
            net: ``net(x, c_noise [B], class_labels, augment_labels) -> F`` with x's shape.
            x: noisy images [B, C, ...] (any float dtype; cast to float32).
            sigma: noise level, a float or [B].
            class_labels / augment_labels: passed to the net unchanged.

        Returns:
            D [B, C, ...] float32.
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.precond.coefficients(sigma))
        out = net(c_in * x, c_noise.flatten(), class_labels, augment_labels)
        return c_skip * x + c_out * out.to(torch.float32)

    def training_losses(self, net: Callable[..., Tensor], x0: Tensor, class_labels: Tensor | None = None,
                        augment_labels: Tensor | None = None, sigma: Tensor | None = None,
                        noise: Tensor | None = None, reduction: str = "mean") -> dict[str, Tensor]:
        """EDM loss per sample: λ(σ) (D(y + σn; σ) - y)² reduced over pixels (spec 2.2).

        Args:
            net: as for :meth:`denoise`. x0: clean (possibly augmented) images y [B, C, ...].
            sigma: [B] noise levels; drawn from the precond's training law when None.
            noise: n ~ N(0, I) [B, C, ...]; drawn when None. (Both use torch's global RNG.)
            reduction: over the pixels of a sample: ``mean`` or ``sum`` (EDM's and Diff-Instruct's code: C·H·W
                times the mean, which under Adam is not the same optimisation, as eps is not scaled with it).

        Returns:
            ``loss`` [B], ``sigma`` [B], ``weight`` [B] and ``denoised`` [B, C, ...].
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if sigma is None:
            sigma = self.precond.sample_sigma(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        sigma = sigma.to(device=x0.device, dtype=torch.float32)
        denoised = self.denoise(net, x0 + sigma.view(-1, *([1] * (x0.ndim - 1))) * noise, sigma, class_labels,
                                augment_labels)
        weight = self.precond.loss_weight(sigma)
        err = (denoised - x0.to(torch.float32)) ** 2
        pixels = tuple(range(1, x0.ndim))
        loss = weight * (err.sum(dim=pixels) if reduction == "sum" else err.mean(dim=pixels))
        return {"loss": loss, "sigma": sigma, "weight": weight, "denoised": denoised}

    # ---------------------------------------------------------------------------------- sampling

    def sigma_steps(self, num_steps: int, device: torch.device | str | None = None) -> Tensor:
        """The σ grid t_0 = σ_max > ... > t_{N-1} = σ_min, then t_N = 0: float64 [N + 1]."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        i = torch.arange(num_steps, dtype=torch.float64, device=device)
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        frac = i / max(num_steps - 1, 1)
        steps = (hi + frac * (lo - hi)) ** self.rho
        return torch.cat([steps, steps.new_zeros(1)])

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, noise: Tensor, *, num_steps: int = 18, solver: str = "heun",
               S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
               generator: Generators = None, progress: bool = False) -> Tensor:
        """EDM's sampler (Algorithm 2): Heun (2N - 1 evaluations) or Euler (N), optionally stochastic.

        Args:
            denoiser: see :data:`Denoiser` (the preconditioned, possibly guided, model).
            noise: ε ~ N(0, I) [B, C, ...]; the chain starts at x_0 = σ_max ε.
            num_steps: N (CIFAR-10: 18; FFHQ/AFHQv2 64: 40; ImageNet-64: 256).
            solver: ``"heun"`` or ``"euler"``.
            S_churn / S_min / S_max / S_noise: churn: at steps with S_min <= t_i <= S_max the level is raised
                to t̂ = t_i (1 + γ), γ = min(S_churn/N, √2 - 1), by adding √(t̂² - t_i²) S_noise ε (ImageNet-64:
                40, 0.05, 50, 1.003). S_churn = 0 is the deterministic ODE sampler.
            generator: source of the churn noise: one generator, or one per sample so that each sample depends
                only on its own seed (as EDM's ``generate.py``).
            progress: show a tqdm bar.

        Returns:
            samples with noise's shape and dtype. The state is kept in float64 (float32 on MPS).
        """
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
        state_dtype = torch.float32 if noise.device.type == "mps" else torch.float64
        steps = self.sigma_steps(num_steps).tolist()
        gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
        batch = noise.shape[0]

        def evaluate(x: Tensor, sigma: float) -> Tensor:
            level = torch.full((batch,), sigma, dtype=torch.float32, device=x.device)
            return denoiser(x.to(torch.float32), level).to(state_dtype)

        x = noise.to(state_dtype) * steps[0]
        indices: Any = range(num_steps)
        if progress:
            from tqdm.auto import tqdm  # only needed for interactive runs

            indices = tqdm(indices)
        for i in indices:
            t_cur, t_next = steps[i], steps[i + 1]
            gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
            t_hat = t_cur * (1 + gamma)
            x_hat = x
            if gamma > 0:
                eps = GaussianDiffusion._randn(x.shape, generator, x.device, state_dtype)
                x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * S_noise * eps
            d = (x_hat - evaluate(x_hat, t_hat)) / t_hat
            x = x_hat + (t_next - t_hat) * d
            if solver == "heun" and i < num_steps - 1:
                d_next = (x - evaluate(x, t_next)) / t_next
                x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
        return x.to(noise.dtype)
