"""Discrete-time Gaussian diffusion (DDPM / IDDPM / ADM) and its DDPM and DDIM samplers.

Notation (index t = 0..N-1 of *this* process; ᾱ_{-1} = 1):

* forward:    x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε,                         ᾱ_t = Π_{s≤t} (1 - β_s)
* posterior:  q(x_{t-1} | x_t, x₀) = N(c1_t x₀ + c2_t x_t, β̃_t),   β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t)
              c1_t = β_t √ᾱ_{t-1} / (1-ᾱ_t),  c2_t = (1-ᾱ_{t-1}) √α_t / (1-ᾱ_t)
* prediction: "epsilon" (ε), "x0" (x₀) or "v" (v = √ᾱ_t ε - √(1-ᾱ_t) x₀)
* reverse:    p(x_{t-1} | x_t) = N(posterior mean at x̂₀, σ²_t) with σ²_t
              "fixedsmall": β̃_t;  "fixedlarge": [β̃_1, β_1, ..., β_{N-1}];
              "learned_range": the net outputs 2C channels, the second half v ∈ [-1, 1] gives
              log σ²_t = (v+1)/2 · log β_t + (1 - (v+1)/2) · log β̃_t (β̃_0 replaced by β̃_1).

A respaced process (``respace``) keeps a subset of the original timesteps, recomputes β from ᾱ at the kept
steps and remembers ``timestep_map``; every call to the net goes through :meth:`model_timesteps`, so the net
always sees the original int64 timesteps 0..T-1 (ADM with ``rescale_timesteps=False``).

Nets are plain callables ``model_fn(x, t, **model_kwargs) -> output``; guidance, label dropping, etc. are
done by wrapping the callable (see :meth:`GaussianDiffusion.guided_output`). Tables are float64 buffers and
are cast to the dtype of ``x`` only when read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .guidance import apply_guidance

__all__ = [
    "GaussianDiffusion",
    "ModelFn",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "mean_flat",
    "normal_kl",
    "timestep_law",
    "space_timesteps",
]

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, or one per sample (index 0 of the batch dimension)."""

ModelFn = Callable[..., Tensor]
"""``model_fn(x [B, C, ...], t [B] int64 original timesteps, **model_kwargs) -> output [B, C or 2C, ...]``."""

PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("fixedsmall", "fixedlarge", "learned_range")


# --------------------------------------------------------------------------------------------- schedules


def get_beta_schedule(schedule: str, num_timesteps: int = 1000) -> Tensor:
    """β_t for t = 0..T-1 in float64.

    Args:
        schedule: ``"linear"`` (DDPM/ADM: β linear from 1e-4·1000/T to 0.02·1000/T, so any T has the same
            total noise as T = 1000) or ``"cosine"`` (IDDPM: ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2),
            β_t = 1 - ᾱ(t+1)/ᾱ(t) clipped at 0.999 so the last steps stay invertible).
        num_timesteps: T.

    Returns:
        Tensor [T], float64.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        abar = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Original timesteps kept by a respaced process, sorted ascending.

    Two conventions (both those of IDDPM/ADM, so published samplers are reproduced step for step):

    * ``"ddimN"``: the integer stride k with ``len(range(0, T, k)) == N``, i.e. timesteps 0, k, 2k, ...
      ``"ddim100"`` with T = 1000 gives 0, 10, ..., 990 (T2H's DDIM-100 sampler). Raises if no stride fits.
    * ``N``, ``"N"``, ``"N1,N2,..."`` or a list ``[N1, N2, ...]``: split [0, T) into equal sections (the
      first T mod K sections one step longer) and keep N_i roughly evenly spaced steps in section i,
      including both ends of the section: ``start + round(j · (size-1)/(N_i-1))``. ``"250"`` with T = 1000
      gives round(j · 999/249), which includes 0 and 999 (DiT's sampler).

    Args:
        num_timesteps: T of the process being respaced.
        section_counts: see above.

    Returns:
        Sorted list of distinct kept timesteps in [0, T).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives exactly {desired} steps out of {num_timesteps}")
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot keep {count} steps in a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index by repeated addition (not j * stride): this reproduces the exact
        # rounding of the reference implementation, including ties, so the kept steps match bit for bit.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


# ------------------------------------------------------------------------------------------ pure math


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of 8-bit data under a Gaussian discretised to 256 bins.

    The data x ∈ [-1, 1] sit on the 256 bin centres spaced 2/255 apart; the bin of x is x ± 1/255, and the
    two outermost bins extend to ∓∞ (as in DDPM/ADM's decoder term L_0). Uses the exact normal CDF (ADM
    uses a tanh approximation of it; the two differ by < 1e-3 in probability).

    Args:
        x: data [B, ...] in [-1, 1].
        mean: Gaussian mean, broadcastable to x.
        log_scale: log standard deviation (= 0.5 · log variance), broadcastable to x.

    Returns:
        log p(x) per element, shape of x.
    """
    inv_std = torch.exp(-log_scale)
    centred = x - mean
    upper = inv_std * (centred + 1.0 / 255.0)
    lower = inv_std * (centred - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper), for the lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower), for the highest bin
    # Bin mass Φ(upper) - Φ(lower); in the right tail use the survival functions to avoid cancellation.
    mass = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(mass.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))


# -------------------------------------------------------------------------------------------- process


def timestep_law(num_timesteps: int, scale: float, reverse: bool = False) -> Tensor:
    """Categorical law of t in 0..T-1: P(t) ∝ (t + 1)^s, or P(t) ∝ (T - t)^s with ``reverse``. float64 ``[T]``.

    s = 0 is the uniform law. With s = 1 and T = 1000 the means are (2T + 1) / 3 - 1 = 666 and (T - 1) / 3 = 333;
    the reversed law's mean is about T / (s + 2) in general. Diffusion Tuning's target and replay laws, and
    :class:`GaussianDiffusion`'s ``low_noise_scale``.
    """
    weights = torch.arange(1, num_timesteps + 1, dtype=torch.float64) ** scale  # i = t + 1
    weights = weights.flip(0) if reverse else weights  # T - t = i reversed
    return weights / weights.sum()


class GaussianDiffusion(nn.Module):
    """Gaussian diffusion process (no weights): forward noising, posterior, losses, DDPM/DDIM samplers.

    An ``nn.Module`` only so that ``.to(device)`` and Lightning move its tables; all tables are
    non-persistent float64 buffers (nothing lands in checkpoints) and stay float64 under ``.half()``,
    ``.to(torch.bfloat16)`` or precision plugins.

    Args:
        num_timesteps: T (ignored when ``betas`` is given).
        schedule: ``"linear"`` or ``"cosine"`` (see :func:`get_beta_schedule`).
        prediction: what the net predicts: ``"epsilon"``, ``"x0"`` or ``"v"``.
        variance: ``"fixedsmall"`` (β̃_t), ``"fixedlarge"`` (β_t with β_0 replaced by β̃_1; DDPM/CBDM) or
            ``"learned_range"`` (IDDPM/DiT: the net outputs 2C channels and the loss is MSE + VB).
        betas: explicit β (any length N, values in (0, 1]); overrides ``schedule``/``num_timesteps``.
        timestep_map: original timestep of each index, int64 [N]; defaults to 0..N-1. Set by :meth:`respace`.
        low_noise_scale: s of the training law of :meth:`sample_timesteps`, P(t) ∝ (N - t)^s
            (:func:`timestep_law` reversed). 0 (default) is the uniform t of DDPM/DiT; s > 0 draws low-noise
            steps more often (mean t ≈ N / (s + 2): 333 of 1000 at s = 1). Sampling never uses it.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    log_betas: Tensor
    fixedlarge_log_variance: Tensor
    timestep_map: Tensor
    timestep_probs: Tensor | None

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        prediction: str = "epsilon",
        variance: str = "fixedlarge",
        *,
        betas: Tensor | Sequence[float] | None = None,
        timestep_map: Tensor | Sequence[int] | None = None,
        low_noise_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if not math.isfinite(low_noise_scale) or low_noise_scale < 0:
            raise ConfigError(f"low_noise_scale must be a finite number >= 0 (0: uniform t), got {low_noise_scale}")
        self.low_noise_scale = float(low_noise_scale)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        self.prediction = prediction
        self.variance = variance
        self.schedule = schedule if betas is None else "custom"

        b = get_beta_schedule(schedule, num_timesteps) if betas is None else torch.as_tensor(betas)
        b = b.detach().to("cpu", torch.float64).flatten()
        if b.numel() < 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1]")
        n = b.numel()
        self.num_timesteps = n
        tmap = torch.arange(n) if timestep_map is None else torch.as_tensor(timestep_map)
        tmap = tmap.to("cpu", torch.int64).flatten()
        if tmap.numel() != n:
            raise ValueError(f"timestep_map has {tmap.numel()} entries for {n} betas")
        self.original_num_timesteps = int(tmap.max()) + 1 if timestep_map is not None else n

        abar = torch.cumprod(1 - b, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = b * (1 - abar_prev) / (1 - abar)
        # β̃_0 = 0, so its log is clipped to β̃_1 (the t = 0 step only feeds the decoder term). With a
        # single step there is no β̃_1; β_0 is the only sensible stand-in.
        first = post_var[1] if n > 1 else b[0]
        post_var_clipped = torch.cat([first.view(1), post_var[1:]])
        large_var = torch.cat([first.view(1), b[1:]])

        def buf(name: str, value: Tensor) -> None:
            self.register_buffer(name, value, persistent=False)

        buf("betas", b)
        buf("alphas_cumprod", abar)
        buf("alphas_cumprod_prev", abar_prev)
        buf("sqrt_alphas_cumprod", abar.sqrt())
        buf("sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt())
        buf("posterior_variance", post_var)
        buf("posterior_log_variance_clipped", post_var_clipped.log())
        buf("posterior_mean_coef1", b * abar_prev.sqrt() / (1 - abar))
        buf("posterior_mean_coef2", (1 - abar_prev) * (1 - b).sqrt() / (1 - abar))
        buf("log_betas", b.log())
        buf("fixedlarge_log_variance", large_var.log())
        buf("timestep_map", tmap)
        # None for the uniform default, which draws with torch.randint exactly as before.
        self.register_buffer("timestep_probs", timestep_law(n, self.low_noise_scale, reverse=True)
                             if self.low_noise_scale else None, persistent=False)

    def extra_repr(self) -> str:
        return (f"num_timesteps={self.num_timesteps}, original_num_timesteps={self.original_num_timesteps}, "
                f"schedule={self.schedule!r}, prediction={self.prediction!r}, variance={self.variance!r}"
                + (f", low_noise_scale={self.low_noise_scale}" if self.low_noise_scale else ""))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GaussianDiffusion:
        # Follow device moves but never dtype casts: the tables lose ~3 digits in float32 near t = 0 and
        # are useless in bf16, and Lightning's precision plugins / .half() would otherwise cast them.
        for name, b in self._buffers.items():
            if b is None:
                continue
            moved = fn(b)
            if b.is_floating_point():
                # MPS has no float64; float32 is the best it can hold.
                dtype = torch.float32 if moved.device.type == "mps" else torch.float64
                moved = b.to(device=moved.device, dtype=dtype)
            self._buffers[name] = moved
        return self

    # ---------------------------------------------------------------------------------- helpers

    @staticmethod
    def _extract(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """table[t] cast to x's dtype/device and shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
        vals = table[t.to(table.device, torch.int64)]
        return vals.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def _as_index(self, t: Tensor | int, x: Tensor) -> Tensor:
        """Timestep index as int64 [B] on x's device; an int is broadcast to the batch."""
        if isinstance(t, int):
            return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
        return t.to(device=x.device, dtype=torch.int64)

    @staticmethod
    def _randn(shape: Sequence[int], generator: Generators, device: torch.device | str | None,
               dtype: torch.dtype) -> Tensor:
        # Draw in float32 on the generator's own device, then move/cast: a seed then gives the same noise
        # whatever the sampling device or dtype (a CPU generator can drive GPU sampling).
        if isinstance(generator, (list, tuple)):
            # One generator per sample: sample i's noise depends on its own seed only, never on the batch
            # it is drawn in (EDM's convention for reproducible predict across batch sizes and devices).
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
            return torch.stack([GaussianDiffusion._randn(shape[1:], g, device, dtype) for g in generator])
        gen_device = generator.device if generator is not None else device
        z = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
        return z.to(device=device, dtype=dtype)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original timesteps the net sees for process indices t: int64 [B] -> int64 [B] in [0, T_orig)."""
        return self.timestep_map[t.to(self.timestep_map.device, torch.int64)].to(t.device)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, law: Tensor | None = None) -> Tensor:
        """Training timestep indices: int64 [batch] on ``device``.

        t ~ ``law`` (probabilities [N], e.g. a :func:`timestep_law`) when given; else P(t) ∝ (N - t)^s with
        ``low_noise_scale`` s > 0; else Uniform{0, ..., N-1}.
        """
        gen_device = generator.device if generator is not None else device
        probs = self.timestep_probs if law is None else law
        if probs is None:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        else:
            probs = probs if gen_device is None else probs.to(gen_device)
            t = torch.multinomial(probs, batch, replacement=True, generator=generator)
        return t.to(device)

    def split_output(self, model_output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Split a net output [B, C or 2C, ...] into (prediction [B, C, ...], variance values or None)."""
        if self.variance == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"learned_range needs 2C = {2 * channels} output channels, "
                                 f"got {model_output.shape[1]}")
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(f"variance={self.variance!r} needs C = {channels} output channels, "
                             f"got {model_output.shape[1]}")
        return model_output, None

    def guided_output(self, cond: Tensor, uncond: Tensor, scale: float | Tensor,
                      guidance_channels: int | None = None) -> Tensor:
        """Classifier-free guidance of raw net outputs, aware of learned-variance channels.

        Same as :func:`~diffusion_transfer.diffusion.guidance.apply_guidance` (scale s, DiT convention;
        CBDM/T2H ``w`` is ``s = 1 + w``) except that ``guidance_channels=None`` means "all prediction
        channels": with ``learned_range`` the variance half is never guided and is taken from ``cond``.

        Args:
            cond, uncond: raw net outputs [B, C or 2C, ...].
            scale: float or [B] tensor.
            guidance_channels: number of leading channels to guide (3 reproduces DiT), or None.

        Returns:
            Guided output with the shape of ``cond``; feed it to :meth:`p_mean_variance` or a step function.
        """
        if guidance_channels is None:
            c = cond.shape[1]
            guidance_channels = c // 2 if self.variance == "learned_range" else c
        return apply_guidance(cond, uncond, scale, guidance_channels)

    # ------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x0: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """Mean [B, ...] and variance [B, 1, ...] of q(x_t | x₀) = N(√ᾱ_t x₀, 1 - ᾱ_t)."""
        t = self._as_index(t, x0)
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0,
                self._extract(1 - self.alphas_cumprod, t, x0))

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None,
                 generator: Generators = None) -> Tensor:
        """Draw x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε.

        Args:
            x0: clean data [B, C, ...].
            t: process indices, int64 [B] (or an int for the whole batch).
            noise: ε with the shape of x0; drawn (optionally from ``generator``) when None.

        Returns:
            x_t, shape and dtype of x0.
        """
        t = self._as_index(t, x0)
        if noise is None:
            noise = self._randn(x0.shape, generator, x0.device, x0.dtype)
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor,
                                  t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior q(x_{t-1} | x_t, x₀).

        Args:
            x0: clean data (or a prediction of it) [B, C, ...].
            xt: noisy data at index t, same shape.
            t: process indices, int64 [B].

        Returns:
            (mean [B, C, ...], variance β̃_t [B, 1, ...], clipped log-variance [B, 1, ...]). At t = 0 the
            mean is x₀ and the variance 0 (its log is clipped to log β̃_1).
        """
        t = self._as_index(t, xt)
        mean = (self._extract(self.posterior_mean_coef1, t, xt) * x0
                + self._extract(self.posterior_mean_coef2, t, xt) * xt)
        return (mean, self._extract(self.posterior_variance, t, xt),
                self._extract(self.posterior_log_variance_clipped, t, xt))

    # ------------------------------------------------------------ conversions between targets

    def x0_from_eps(self, xt: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """x₀ = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t. Shapes [B, C, ...]; t int64 [B]."""
        t = self._as_index(t, xt)
        return (xt - self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / self._extract(
            self.sqrt_alphas_cumprod, t, xt)

    def eps_from_x0(self, xt: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """ε = (x_t - √ᾱ_t x₀) / √(1-ᾱ_t). Shapes [B, C, ...]; t int64 [B]."""
        t = self._as_index(t, xt)
        return (xt - self._extract(self.sqrt_alphas_cumprod, t, xt) * x0) / self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, xt)

    def x0_from_v(self, xt: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """x₀ = √ᾱ_t x_t - √(1-ᾱ_t) v. Shapes [B, C, ...]; t int64 [B]."""
        t = self._as_index(t, xt)
        return self._extract(self.sqrt_alphas_cumprod, t, xt) * xt - self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, xt) * v

    def v_target(self, x0: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x₀ (Salimans & Ho 2022). Shapes [B, C, ...]; t int64 [B]."""
        t = self._as_index(t, x0)
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * eps - self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def training_target(self, x0: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """Regression target of the configured ``prediction`` for x_t = q_sample(x0, t, eps): [B, C, ...]."""
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "x0":
            return x0
        return self.v_target(x0, t, eps)

    # ------------------------------------------------------------------------- reverse process

    def p_mean_variance(self, model_output: Tensor, xt: Tensor, t: Tensor | int,
                        clip_denoised: bool = False) -> dict[str, Tensor]:
        """Reverse step p(x_{t-1} | x_t) from a raw net output (so callers can run or guide the net).

        Args:
            model_output: net output at (x_t, model_timesteps(t)): [B, C, ...], or [B, 2C, ...] with
                ``learned_range`` (prediction channels first, then the variance interpolation v).
            xt: x_t [B, C, ...].
            t: process indices, int64 [B].
            clip_denoised: clamp x̂₀ to [-1, 1] before forming the mean (pixel-space data only).

        Returns:
            dict with ``mean`` [B, C, ...], ``variance`` and ``log_variance`` ([B, C, ...] when learned,
            else [B, 1, ...]), ``pred_x0`` and ``pred_eps`` [B, C, ...] (ε consistent with the possibly
            clipped x̂₀).
        """
        t = self._as_index(t, xt)
        pred, var_values = self.split_output(model_output, xt.shape[1])

        if var_values is not None:
            # v ∈ [-1, 1] interpolates (in log space) between the two bounds β̃_t and β_t of IDDPM.
            frac = (var_values + 1) / 2
            log_var = (frac * self._extract(self.log_betas, t, xt)
                       + (1 - frac) * self._extract(self.posterior_log_variance_clipped, t, xt))
        elif self.variance == "fixedlarge":
            log_var = self._extract(self.fixedlarge_log_variance, t, xt)
        else:
            log_var = self._extract(self.posterior_log_variance_clipped, t, xt)

        if self.prediction == "epsilon":
            pred_x0 = self.x0_from_eps(xt, t, pred)
        elif self.prediction == "x0":
            pred_x0 = pred
        else:
            pred_x0 = self.x0_from_v(xt, t, pred)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        # Keep the net's own ε when nothing changed x̂₀, so ε-prediction stays exact (DDIM uses it).
        if self.prediction == "epsilon" and not clip_denoised:
            pred_eps = pred
        else:
            pred_eps = self.eps_from_x0(xt, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {"mean": mean, "variance": log_var.exp(), "log_variance": log_var,
                "pred_x0": pred_x0, "pred_eps": pred_eps}

    # ---------------------------------------------------------------------------------- losses

    def vb_bpd(self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor | int) -> Tensor:
        """Variational-bound term per sample, in bits per dimension.

        KL(q(x_{t-1}|x_t,x₀) || p(x_{t-1}|x_t)) for t > 0 and the discretised-Gaussian decoder NLL
        -log p(x₀|x_1-step) at t = 0 (ADM's L_t / L_0), both averaged over dimensions and divided by ln 2.
        Gradients flow through whatever parts of ``model_output`` are not detached by the caller.

        Args:
            model_output: raw net output, as for :meth:`p_mean_variance`.
            x0: clean data [B, C, ...] in [-1, 1] (the decoder term assumes 8-bit data).
            xt: x_t [B, C, ...].
            t: process indices, int64 [B].

        Returns:
            vb [B], bits/dim.
        """
        t = self._as_index(t, xt)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                        model_kwargs: dict[str, Any] | None = None,
                        generator: Generators = None) -> dict[str, Tensor]:
        """Per-sample training loss at given timesteps (take ``.mean()`` yourself, or reweight).

        ``mse`` is the mean squared error of the prediction channels against the target of ``prediction``
        (ε, x₀ or v). ``vb`` is :meth:`vb_bpd` evaluated with the prediction channels DETACHED, so with
        ``learned_range`` it trains only the variance channels (IDDPM hybrid loss, DiT:
        ``loss = mse + vb``). With a fixed variance ``vb`` is still reported (no gradient) but
        ``loss = mse``.

        Args:
            model_fn: ``model_fn(x_t, t_model, **model_kwargs)``; t_model = original int64 timesteps.
            x0: clean data [B, C, ...].
            t: process indices, int64 [B] (e.g. from :meth:`sample_timesteps`).
            noise: ε [B, C, ...]; drawn from ``generator`` when None.
            model_kwargs: extra net inputs (labels, ...).

        Returns:
            dict: ``loss``, ``mse``, ``vb`` (each [B]), plus ``x_t`` and ``model_output`` (the net's raw
            output, for regularisers that need it).
        """
        t = self._as_index(t, x0)
        if noise is None:
            noise = self._randn(x0.shape, generator, x0.device, x0.dtype)
        xt = self.q_sample(x0, t, noise)
        output = self._model_output(model_fn, xt, t, model_kwargs or {})
        pred, var_values = self.split_output(output, x0.shape[1])
        mse = mean_flat((self.training_target(x0, t, noise) - pred) ** 2)
        frozen = pred.detach() if var_values is None else torch.cat([pred.detach(), var_values], dim=1)
        vb = self.vb_bpd(frozen, x0, xt, t)
        loss = mse + vb if var_values is not None else mse
        return {"loss": loss, "mse": mse, "vb": vb, "x_t": xt, "model_output": output}

    # -------------------------------------------------------------------------------- samplers

    def ddpm_step(self, model_output: Tensor, x: Tensor, t: Tensor | int, *, noise: Tensor | None = None,
                  clip_denoised: bool = False,
                  generator: Generators = None) -> tuple[Tensor, Tensor]:
        """One ancestral step x_t -> x_{t-1} = μ_θ + σ_t z (no noise at t = 0).

        Args:
            model_output: raw net output at (x, model_timesteps(t)).
            x: x_t [B, C, ...].
            t: process indices, int64 [B].
            noise: z with the shape of x; drawn from ``generator`` when None.

        Returns:
            (x_{t-1} [B, C, ...], x̂₀ [B, C, ...]).
        """
        t = self._as_index(t, x)
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = self._randn(x.shape, generator, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, out["pred_x0"]

    def ddim_step(self, model_output: Tensor, x: Tensor, t: Tensor | int, *, eta: float = 0.0,
                  noise: Tensor | None = None, clip_denoised: bool = False,
                  generator: Generators = None) -> tuple[Tensor, Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); at t = 0 it returns x̂₀.

        x_{t-1} = √ᾱ_{t-1} x̂₀ + √(1-ᾱ_{t-1}-σ²) ε̂ + σ z with
        σ = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}). η = 0 is deterministic, η = 1 matches DDPM's β̃.
        Learned variance channels, if any, are ignored.

        Args:
            model_output: raw net output at (x, model_timesteps(t)).
            x: x_t [B, C, ...].
            t: process indices, int64 [B].
            eta: η ≥ 0.
            noise: z with the shape of x; drawn from ``generator`` when None and η > 0.

        Returns:
            (x_{t-1} [B, C, ...], x̂₀ [B, C, ...]).
        """
        t = self._as_index(t, x)
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        x_prev = abar_prev.sqrt() * out["pred_x0"]
        if eta > 0:
            sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
            if noise is None:
                noise = self._randn(x.shape, generator, x.device, x.dtype)
            x_prev = x_prev + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * out["pred_eps"] + sigma * noise
        else:
            x_prev = x_prev + (1 - abar_prev).sqrt() * out["pred_eps"]
        return x_prev, out["pred_x0"]

    def ddim_reverse_step(self, model_output: Tensor, x: Tensor, t: Tensor | int, *,
                          clip_denoised: bool = False) -> Tensor:
        """Deterministic (η = 0) DDIM encoding step from level t-1 to level t, the mirror of ``ddim_step``.

        ``x`` is at noise level t-1 (clean data for t = 0) and ``model_output`` is the net evaluated at
        (x, model_timesteps(t)), standing in for its unknown value at x_t. Then
        x̂₀ = (x - √(1-ᾱ_{t-1}) ε̂) / √ᾱ_{t-1} and x_t = √ᾱ_t x̂₀ + √(1-ᾱ_t) ε̂, which :meth:`ddim_step`
        undoes exactly whenever ε̂ is the same at both ends.

        Args:
            model_output: raw net output at (x, model_timesteps(t)).
            x: state at level t-1, [B, C, ...].
            t: process indices, int64 [B].

        Returns:
            x_t [B, C, ...].
        """
        t = self._as_index(t, x)
        eps = self.p_mean_variance(model_output, x, t)["pred_eps"]
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        x0 = (x - (1 - abar_prev).sqrt() * eps) / abar_prev.sqrt()
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def _indices(self, reverse: bool, progress: bool) -> Iterable[int]:
        steps: Iterable[int] = range(self.num_timesteps - 1, -1, -1) if reverse else range(self.num_timesteps)
        if progress:
            from tqdm.auto import tqdm  # only needed for interactive runs

            steps = tqdm(steps, total=self.num_timesteps)
        return steps

    def _initial_noise(self, shape: Sequence[int] | None, noise: Tensor | None,
                       generator: Generators, device: torch.device | str | None,
                       dtype: torch.dtype) -> Tensor:
        if noise is not None:
            return noise
        if shape is None:
            raise ValueError("give either shape or noise")
        return self._randn(shape, generator, device if device is not None else self.betas.device, dtype)

    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, shape: Sequence[int] | None = None, *,
                    noise: Tensor | None = None, model_kwargs: dict[str, Any] | None = None,
                    clip_denoised: bool = False,
                    generator: Generators = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, progress: bool = False) -> Tensor:
        """Ancestral DDPM sampling over all N steps of this (possibly respaced) process, under no_grad.

        Args:
            model_fn: ``model_fn(x, t_model, **model_kwargs)``; wrap it for guidance.
            shape: [B, C, ...] of the samples (or give ``noise``).
            noise: starting x_{N-1}; drawn from ``generator`` when None.
            clip_denoised: clamp x̂₀ to [-1, 1] at every step (pixel data). DiT/CBDM/T2H: False.
            generator: source of all randomness (start and per-step noise); same seed -> same samples.
            device: where to sample (default: the tables' device); dtype: sample dtype.
            progress: show a tqdm bar.

        Returns:
            x [B, C, ...], not clipped.
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)
        return self._reverse_loop(self.ddpm_step, model_fn, x, model_kwargs, progress,
                                  clip_denoised=clip_denoised, generator=generator)

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape: Sequence[int] | None = None, *,
                    noise: Tensor | None = None, eta: float = 0.0,
                    model_kwargs: dict[str, Any] | None = None, clip_denoised: bool = False,
                    generator: Generators = None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, progress: bool = False) -> Tensor:
        """DDIM sampling over all N steps of this process (respace first, e.g. ``respace("ddim100")``).

        Arguments as :meth:`ddpm_sample`, plus ``eta`` (0 = deterministic). The last step returns x̂₀ at
        index 0 (ᾱ_{-1} = 1).

        Returns:
            x [B, C, ...], not clipped.
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)
        return self._reverse_loop(self.ddim_step, model_fn, x, model_kwargs, progress, eta=eta,
                                  clip_denoised=clip_denoised, generator=generator)

    def _reverse_loop(self, step: Callable[..., tuple[Tensor, Tensor]], model_fn: ModelFn, x: Tensor,
                      model_kwargs: dict[str, Any] | None, progress: bool, **step_kwargs: Any) -> Tensor:
        """Run ``step`` (:meth:`ddpm_step` or :meth:`ddim_step`) from index N-1 down to 0."""
        kwargs = model_kwargs or {}
        for i in self._indices(reverse=True, progress=progress):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            x, _ = step(self._model_output(model_fn, x, t, kwargs), x, t, **step_kwargs)
        return x

    def _model_output(self, model_fn: ModelFn, x: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The net's output at process indices ``t``, in ``x``'s dtype.

        Under autocast (bf16-mixed) the net returns bf16; the loss terms, their reduction and the sampler's
        update then run in the data's float32, as the mixed-precision recipe requires.
        """
        return model_fn(x, self.model_timesteps(t), **kwargs).to(x.dtype)

    @torch.no_grad()
    def ddim_invert(self, model_fn: ModelFn, x0: Tensor, *, model_kwargs: dict[str, Any] | None = None,
                    clip_denoised: bool = False, progress: bool = False) -> Tensor:
        """Deterministic DDIM inversion: encode clean data to x_{N-1} with :meth:`ddim_reverse_step`.

        ``ddim_sample(model_fn, noise=ddim_invert(model_fn, x0))`` ≈ x0; the error vanishes as the steps get
        finer (it comes only from evaluating ε̂ one level early).

        Args:
            model_fn: as for :meth:`ddim_sample`; x0: clean data [B, C, ...].

        Returns:
            x_{N-1} [B, C, ...].
        """
        x = x0
        kwargs = model_kwargs or {}
        for i in self._indices(reverse=False, progress=progress):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            x = self.ddim_reverse_step(self._model_output(model_fn, x, t, kwargs), x, t,
                                       clip_denoised=clip_denoised)
        return x

    # ------------------------------------------------------------------------------- respacing

    def respace(self, steps: int | str | Sequence[int]) -> GaussianDiffusion:
        """A process that keeps a subset of this one's timesteps (see :func:`space_timesteps`).

        Its β'_i = 1 - ᾱ_{k_i}/ᾱ_{k_{i-1}} (ᾱ_{k_{-1}} = 1) keep ᾱ equal at the kept steps k_i, its fixed or
        learned variances are built from its own β' and β̃', and its ``timestep_map`` sends index i to the
        original timestep (composed when respacing a respaced process). Same prediction and variance type;
        tables live on this process's device.

        Args:
            steps: e.g. 250, ``"250"``, ``"ddim100"``, ``"10,15,20"`` or ``[10, 15, 20]``.

        Returns:
            New GaussianDiffusion with N' = number of kept steps.
        """
        kept = torch.tensor(space_timesteps(self.num_timesteps, steps), dtype=torch.int64)
        abar = self.alphas_cumprod.detach().to("cpu", torch.float64)[kept]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        new = GaussianDiffusion(prediction=self.prediction, variance=self.variance,
                                betas=1 - abar / abar_prev,
                                timestep_map=self.timestep_map.detach().cpu()[kept])
        new.original_num_timesteps = self.original_num_timesteps
        new.schedule = self.schedule
        return new.to(self.betas.device)
