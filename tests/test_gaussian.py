"""GaussianDiffusion and guidance checked against closed-form Gaussian math (CPU, tiny tensors).

Tensors stay small (a few thousand elements) because long sampler loops on many-thread OpenMP with tiny
ops are dominated by threading overhead on the 2-core CI machines.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_transfer.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    space_timesteps,
    timestep_law,
)
from diffusion_transfer.diffusion.guidance import apply_guidance

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def point_mass_eps(base: GaussianDiffusion, point: torch.Tensor):
    """Exact ε for data = a single point x*: ε(x_t, t) = (x_t - √ᾱ_t x*) / √(1-ᾱ_t); t = original timestep."""

    def model_fn(x, t):
        abar = bcast(base.alphas_cumprod[t], x)
        return (x - abar.sqrt() * point) / (1 - abar).sqrt()

    return model_fn


def gaussian_eps(base: GaussianDiffusion, mu: float, s: float):
    """Exact ε for data ~ N(mu, s² I): x_t ~ N(√ᾱ mu, ᾱ s² + 1 - ᾱ), ε = -√(1-ᾱ) ∇log p(x_t)."""

    def model_fn(x, t):
        abar = bcast(base.alphas_cumprod[t], x)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)

    return model_fn


# ------------------------------------------------------------------------------------------ schedules


def test_linear_schedule_float64_and_cumprod():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.betas.dtype == F64
    assert d.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert d.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - d.betas, 0), rtol=0, atol=1e-15)
    # Scaled for other T so the total noise matches T = 1000.
    b = get_beta_schedule("linear", 500)
    assert b[0].item() == pytest.approx(2e-4) and b[-1].item() == pytest.approx(0.04)


def test_cosine_schedule_clipped_at_0999():
    b = get_beta_schedule("cosine", 1000)
    assert b.dtype == F64 and b.max().item() == pytest.approx(0.999, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.999, abs=1e-15)  # ᾱ(T) = cos²(π/2) = 0 would give β = 1

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    abar = torch.cumprod(1 - b, 0)
    for t in (0, 10, 500, 900):  # before any clipping, ᾱ_t telescopes to f(t+1)/f(0)
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)


# ---------------------------------------------------------------------------------- forward process


def test_q_sample_moments():
    d = GaussianDiffusion()
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.full((4, 2, 64, 64), 0.7, dtype=F64)
    xt = d.q_sample(x0, t, generator=gen(0))
    n = x0[0].numel()
    abar = d.alphas_cumprod[t]
    emp_mean = xt.flatten(1).mean(1)
    emp_var = xt.flatten(1).var(1)
    # CLT: mean error ~ sqrt(var/n), variance error ~ var*sqrt(2/n); allow 5 standard errors.
    assert torch.all((emp_mean - abar.sqrt() * 0.7).abs() < 5 * ((1 - abar) / n).sqrt())
    assert torch.all((emp_var - (1 - abar)).abs() < 5 * (1 - abar) * math.sqrt(2 / n))
    # q_mean_variance gives the same closed form.
    mean, var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean[:, 0, 0, 0], abar.sqrt() * 0.7)
    torch.testing.assert_close(var.flatten(), 1 - abar)


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1}|x_t,x0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x0."""
    d = GaussianDiffusion()
    t = torch.tensor([1, 2, 50, 500, 999])
    x0 = torch.randn(5, 3, 2, 2, generator=gen(1), dtype=F64)
    xt = d.q_sample(x0, t, generator=gen(2))
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)

    ab_prev, beta = bcast(d.alphas_cumprod[t - 1], x0), bcast(d.betas[t], x0)
    alpha = 1 - beta
    m1, v1 = ab_prev.sqrt() * x0, 1 - ab_prev  # x_{t-1} | x0
    m2, v2 = alpha.sqrt() * m1, alpha * v1 + beta  # x_t | x0, with x_t = √α x_{t-1} + √β n
    cov = alpha.sqrt() * v1
    torch.testing.assert_close(mean, m1 + cov / v2 * (xt - m2), rtol=0, atol=1e-10)
    torch.testing.assert_close(var, v1 - cov**2 / v2, rtol=1e-12, atol=0)
    torch.testing.assert_close(log_var, var.log(), rtol=1e-12, atol=0)
    # t = 0: the posterior is a point mass at x0 (log-variance clipped to that of t = 1).
    t0 = torch.zeros(5, dtype=torch.int64)
    mean0, var0, log_var0 = d.q_posterior_mean_variance(x0, xt, t0)
    torch.testing.assert_close(mean0, x0, rtol=0, atol=1e-12)
    assert torch.all(var0 == 0)
    torch.testing.assert_close(log_var0.flatten(), d.posterior_variance[1].log().expand(5))


def test_prediction_conversions_are_exact():
    d = GaussianDiffusion()
    t = torch.tensor([0, 7, 400, 999])
    x0 = torch.randn(4, 3, 4, 4, generator=gen(3), dtype=F64)
    eps = torch.randn(4, 3, 4, 4, generator=gen(4), dtype=F64)
    xt = d.q_sample(x0, t, eps)
    v = d.v_target(x0, t, eps)
    tol = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(d.x0_from_v(xt, t, v), x0, **tol)
    torch.testing.assert_close(d.x0_from_eps(xt, t, eps), x0, **tol)
    torch.testing.assert_close(d.eps_from_x0(xt, t, x0), eps, **tol)
    # The three parameterisations give the same reverse step when each outputs its true target.
    means = []
    for pred in ("epsilon", "x0", "v"):
        p = GaussianDiffusion(prediction=pred)
        target = p.training_target(x0, t, eps)
        out = p.p_mean_variance(target, xt, t)
        torch.testing.assert_close(out["pred_x0"], x0, **tol)
        torch.testing.assert_close(out["pred_eps"], eps, rtol=0, atol=1e-6)  # 1/√(1-ᾱ_0) ≈ 100 amplifies
        means.append(out["mean"])
        loss = p.training_losses(lambda x, tt, target=target: target, x0, t, noise=eps)
        assert torch.all(loss["mse"] == 0)
    torch.testing.assert_close(means[0], means[1], **tol)
    torch.testing.assert_close(means[0], means[2], **tol)


# ------------------------------------------------------------------------------------------ variances


def test_fixedlarge_log_variance_vector():
    d = GaussianDiffusion(variance="fixedlarge")
    expected = torch.cat([d.posterior_variance[1:2], d.betas[1:]]).log()
    torch.testing.assert_close(d.fixedlarge_log_variance, expected, rtol=0, atol=0)
    # ... and it is what the reverse step uses at every t.
    t = torch.arange(1000)
    x = torch.zeros(1000, 1, 1, 1, dtype=F64)
    out = d.p_mean_variance(torch.zeros_like(x), x, t)
    torch.testing.assert_close(out["log_variance"].flatten(), expected, rtol=0, atol=0)
    small = GaussianDiffusion(variance="fixedsmall").p_mean_variance(torch.zeros_like(x), x, t)
    torch.testing.assert_close(small["variance"].flatten()[1:], d.posterior_variance[1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [None, "250"])
def test_learned_range_endpoints(steps):
    d = GaussianDiffusion(variance="learned_range")
    d = d if steps is None else d.respace(steps)
    n = d.num_timesteps
    t = torch.arange(n)
    x = torch.zeros(n, 2, 1, 1, dtype=F64)
    for v, table in ((1.0, d.betas.log()), (-1.0, d.posterior_log_variance_clipped)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        lv = d.p_mean_variance(out, x, t)["log_variance"][:, 0, 0, 0]
        torch.testing.assert_close(lv, table, rtol=0, atol=1e-12)
    if steps is not None:  # the respaced process interpolates between its own β' and β̃'
        assert d.betas[1] > GaussianDiffusion().betas[4]
    with pytest.raises(ValueError):
        d.p_mean_variance(torch.zeros_like(x), x, t)  # C channels instead of 2C


# -------------------------------------------------------------------------------------- losses / VB


def test_vb_zero_for_true_posterior_and_kl_formula():
    d = GaussianDiffusion(variance="learned_range")
    t = torch.tensor([1, 10, 300, 999])
    x0 = torch.randn(4, 2, 3, 3, generator=gen(5), dtype=F64).clamp(-1, 1)
    eps = torch.randn(4, 2, 3, 3, generator=gen(6), dtype=F64)
    xt = d.q_sample(x0, t, eps)
    # ε = true noise gives x̂₀ = x0 (true posterior mean); v = -1 gives σ² = β̃ (true posterior variance).
    exact = torch.cat([eps, -torch.ones_like(eps)], 1)
    assert d.vb_bpd(exact, x0, xt, t).abs().max().item() < 1e-9

    # ε off by δ moves the mean by c1·√(1-ᾱ)/√ᾱ·δ with equal variances: KL = Δ²/(2β̃) nats per dim.
    delta = 0.1
    off = torch.cat([eps + delta, -torch.ones_like(eps)], 1)
    c1 = d.posterior_mean_coef1[t]
    shift = c1 * d.sqrt_one_minus_alphas_cumprod[t] / d.sqrt_alphas_cumprod[t] * delta
    expected = shift**2 / (2 * d.posterior_variance[t]) / math.log(2)
    torch.testing.assert_close(d.vb_bpd(off, x0, xt, t), expected, rtol=1e-9, atol=0)


def test_vb_at_t0_is_discretized_decoder_nll():
    d = GaussianDiffusion(variance="learned_range")
    x0 = (torch.randint(0, 256, (2, 1, 2, 2), generator=gen(7)).to(F64) / 127.5 - 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # both edge bins
    t = torch.zeros(2, dtype=torch.int64)
    eps = torch.randn(x0.shape, generator=gen(8), dtype=F64)
    xt = d.q_sample(x0, t, eps)
    out = torch.cat([eps + 0.3, torch.zeros_like(eps)], 1)  # some wrong mean, mid-range variance
    vb = d.vb_bpd(out, x0, xt, t)
    p = d.p_mean_variance(out, xt, t)

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    nll = torch.zeros(2, dtype=F64)
    for idx in range(x0.numel()):
        b, rest = divmod(idx, 4)
        i, j = divmod(rest, 2)
        x, m = x0[b, 0, i, j].item(), p["mean"][b, 0, i, j].item()
        sd = math.exp(0.5 * p["log_variance"][b, 0, i, j].item())
        hi = 1.0 if x > 0.999 else phi((x + 1 / 255 - m) / sd)
        lo = 0.0 if x < -0.999 else phi((x - 1 / 255 - m) / sd)
        nll[b] -= math.log(hi - lo) / math.log(2) / 4
    torch.testing.assert_close(vb, nll, rtol=1e-8, atol=1e-10)
    # The bin masses of a Gaussian sum to 1 over the 256 bins.
    grid = torch.arange(256, dtype=F64) / 127.5 - 1
    mean, log_scale = torch.tensor(0.1, dtype=F64), torch.tensor(-1.0, dtype=F64)
    ll = discretized_gaussian_log_likelihood(grid, mean, log_scale)
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_hybrid_loss_vb_trains_only_variance_channels():
    d = GaussianDiffusion(variance="learned_range")
    x0 = torch.randn(3, 2, 4, 4, generator=gen(9)).clamp(-1, 1)
    t = torch.tensor([0, 5, 700])
    out_param = torch.randn(3, 4, 4, 4, generator=gen(10), requires_grad=True)
    seen = []

    def model_fn(x, tt):
        seen.append(tt)
        return out_param * 1.0

    losses = d.training_losses(model_fn, x0, t, noise=torch.randn(3, 2, 4, 4, generator=gen(11)))
    assert set(losses) >= {"loss", "mse", "vb"} and losses["loss"].shape == (3,)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out_param, retain_graph=True)
    assert torch.all(g_vb[:, :2] == 0) and g_vb[:, 2:].abs().sum() > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out_param)
    assert torch.all(g_mse[:, 2:] == 0)
    assert seen[0].dtype == torch.int64

    # Fixed variance: vb is reported but carries no gradient and is not part of the loss.
    f = GaussianDiffusion(variance="fixedlarge")
    out2 = torch.randn(3, 2, 4, 4, generator=gen(12), requires_grad=True)
    l2 = f.training_losses(lambda x, tt: out2 * 1.0, x0, t)
    torch.testing.assert_close(l2["loss"], l2["mse"])
    assert not l2["vb"].requires_grad and torch.all(l2["vb"] > 0)


# ------------------------------------------------------------------------------------------ respacing


def test_space_timesteps_conventions():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert kept == [round(i * 999 / 249) for i in range(250)]
    assert space_timesteps(1000, 250) == kept == space_timesteps(1000, [250])
    assert space_timesteps(1000, "ddim100") == list(range(0, 1000, 10))
    # Sections: [0, 50) keeps 10 steps, [50, 100) keeps 5, each including both ends of its section.
    assert space_timesteps(100, [10, 5]) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    assert space_timesteps(100, "10,5") == space_timesteps(100, [10, 5])
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim6")  # no integer stride gives 6 of 10 steps
    with pytest.raises(ValueError):
        space_timesteps(10, [11])


def test_respace_keeps_alphas_cumprod_and_maps_timesteps():
    d = GaussianDiffusion(variance="learned_range")
    r = d.respace("250")
    kept = torch.tensor(space_timesteps(1000, "250"))
    assert r.num_timesteps == 250 and r.original_num_timesteps == 1000
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-13, atol=0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), d.alphas_cumprod[kept][:-1]])
    torch.testing.assert_close(r.betas, 1 - d.alphas_cumprod[kept] / abar_prev, rtol=0, atol=0)
    assert torch.equal(r.timestep_map, kept) and r.variance == "learned_range"
    # Respacing a respaced process composes the maps and still keeps ᾱ.
    rr = r.respace(10)
    assert torch.equal(rr.timestep_map, kept[space_timesteps(250, 10)])
    torch.testing.assert_close(rr.alphas_cumprod, d.alphas_cumprod[rr.timestep_map], rtol=1e-13, atol=0)
    # The net always sees original timesteps, also in training_losses.
    seen = []
    r.training_losses(lambda x, t: seen.append(t) or torch.zeros(2, 2, 2, 2), torch.zeros(2, 1, 2, 2),
                      torch.tensor([0, 249]))
    assert seen[0].tolist() == [0, 999]


def test_ddim100_calls_990_to_0_and_oracle_returns_point():
    base = GaussianDiffusion()
    r = base.respace("ddim100")
    point = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4, dtype=F64).view(2, 3, 4, 4)
    oracle = point_mass_eps(base, point)
    seen = []

    def model_fn(x, t):
        seen.append(int(t[0]))
        return oracle(x, t)

    x = r.ddim_sample(model_fn, point.shape, generator=gen(13), dtype=F64)
    assert seen == list(range(990, -1, -10))
    torch.testing.assert_close(x, point, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
def test_ddpm_with_point_mass_oracle_returns_point(variance):
    base = GaussianDiffusion(variance=variance)
    point = torch.linspace(-0.5, 0.5, 8, dtype=F64).view(2, 1, 2, 2)
    x = base.respace(50).ddpm_sample(point_mass_eps(base, point), point.shape, generator=gen(14), dtype=F64)
    torch.testing.assert_close(x, point, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------- samplers


def test_ddim_eta1_step_equals_ddpm_fixedsmall_step():
    d = GaussianDiffusion(variance="fixedsmall").respace(20)
    x = torch.randn(3, 2, 4, 4, generator=gen(15), dtype=F64)
    out = torch.randn(3, 2, 4, 4, generator=gen(16), dtype=F64)
    z = torch.randn(3, 2, 4, 4, generator=gen(17), dtype=F64)
    t = torch.tensor([19, 7, 1])
    a, _ = d.ddim_step(out, x, t, eta=1.0, noise=z)
    b, _ = d.ddpm_step(out, x, t, noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
def test_ddpm_1000_samples_gaussian_data(variance):
    """With the exact ε of N(mu, s²) data, ancestral sampling reproduces mean mu and std s."""
    mu, s = 0.3, 0.5
    d = GaussianDiffusion(variance=variance)
    x = d.ddpm_sample(gaussian_eps(d, mu, s), (4, 1, 32, 32), generator=gen(18), dtype=F64)
    assert x.mean().item() == pytest.approx(mu, abs=0.03)  # std error 0.5/64 ≈ 0.008
    assert x.std().item() == pytest.approx(s, abs=0.03)


def test_ddim_inversion_is_deterministic_and_converges():
    mu, s = 0.3, 0.5
    base = GaussianDiffusion()
    x0 = mu + s * torch.randn(2, 3, 4, 4, generator=gen(19), dtype=F64)
    errors = {}
    for steps in ("ddim100", "ddim500", 1000):
        r = base.respace(steps)
        fn = gaussian_eps(base, mu, s)
        x_t = r.ddim_invert(fn, x0)
        assert torch.equal(x_t, r.ddim_invert(fn, x0))
        rec = r.ddim_sample(fn, noise=x_t)
        assert torch.equal(rec, r.ddim_sample(fn, noise=x_t))
        errors[steps] = (rec - x0).abs().max().item()
    assert errors[1000] < 1e-2
    # The only error is evaluating ε̂ one level early: first order in the step size (5x steps -> 1/5 error).
    assert 4.0 < errors["ddim100"] / errors["ddim500"] < 6.0


def test_sampling_shapes_and_seed_determinism():
    d = GaussianDiffusion(variance="learned_range").respace(8)

    def model_fn(x, t, scale=1.0):
        return torch.cat([0.1 * scale * x, torch.tanh(x)], 1) + 1e-4 * t.view(-1, 1, 1, 1)

    shape = (2, 3, 4, 4)
    kw = dict(model_kwargs={"scale": 2.0})
    for sample in (d.ddpm_sample, lambda *a, **k: d.ddim_sample(*a, eta=0.5, **k)):
        a = sample(model_fn, shape, generator=gen(20), **kw)
        b = sample(model_fn, shape, generator=gen(20), **kw)
        c = sample(model_fn, shape, generator=gen(21), **kw)
        assert a.shape == shape and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c)
    e = d.ddim_sample(model_fn, shape, generator=gen(20), progress=True)
    f = d.ddim_sample(model_fn, noise=torch.randn(shape, generator=gen(20)))
    assert torch.equal(e, f)  # η = 0: all randomness is the starting noise


def test_tables_stay_float64_and_out_of_state_dict():
    d = GaussianDiffusion().to(torch.float16)
    d.half()
    assert d.betas.dtype == F64 and d.alphas_cumprod.dtype == F64 and d.timestep_map.dtype == torch.int64
    assert len(d.state_dict()) == 0
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float16)
    assert d.q_sample(x, torch.tensor([0, 1])).dtype == torch.float16


def test_low_noise_law_of_training_timesteps():
    """P(t) ∝ (T - t)^s: its mean is Σ t (T-t)^s / Σ (T-t)^s, the draws follow it, s = 0 is torch.randint."""
    from scipy.stats import chisquare

    T, n = 1000, 400_000
    uniform = GaussianDiffusion(T)
    assert uniform.timestep_probs is None
    # s = 0 keeps the old draws bit for bit (runs trained before the option reproduce).
    assert torch.equal(uniform.sample_timesteps(64, gen(3)), torch.randint(0, T, (64,), generator=gen(3)))
    for s in (1.0, 2.0):
        d = GaussianDiffusion(T, low_noise_scale=s)
        t = torch.arange(T, dtype=F64)
        weights = (T - t) ** s
        assert torch.allclose(d.timestep_probs, weights / weights.sum())
        assert torch.allclose(d.timestep_probs, timestep_law(T, s, reverse=True))
        draws = d.sample_timesteps(n, gen(0))
        assert draws.dtype == torch.int64 and int(draws.min()) >= 0 and int(draws.max()) < T
        mean = float((weights * t).sum() / weights.sum())  # s = 1: (T - 1) / 3 = 333
        assert abs(draws.double().mean().item() - mean) < 2.0
        counts = torch.bincount(draws, minlength=T).numpy()
        assert chisquare(counts, d.timestep_probs.numpy() * n).pvalue > 1e-3
        assert chisquare(counts, [n / T] * T).pvalue < 1e-12  # and the test can tell it from uniform
        assert torch.equal(d.sample_timesteps(8, gen(5)), d.sample_timesteps(8, gen(5)))
    assert abs(float((timestep_law(T, 1.0, reverse=True) * torch.arange(T)).sum()) - (T - 1) / 3) < 1e-9
    # The law stays float64 under casts, out of the state dict, and respaced (sampling) processes drop it.
    d = GaussianDiffusion(T, low_noise_scale=1.0).to(torch.bfloat16)
    assert d.timestep_probs.dtype == F64 and len(d.state_dict()) == 0
    assert d.respace(50).timestep_probs is None
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="low_noise_scale"):
            GaussianDiffusion(T, low_noise_scale=bad)


# ------------------------------------------------------------------------------------------- guidance


def test_guidance_identities():
    c = torch.randn(4, 8, 2, 2, generator=gen(22))
    u = torch.randn(4, 8, 2, 2, generator=gen(23))
    assert torch.equal(apply_guidance(c, u, 1.0), c)
    torch.testing.assert_close(apply_guidance(c, u, 0.0), u)
    # CBDM/T2H weight w = 1.5 is scale s = 1 + w: 2.5 ε_c - 1.5 ε_u.
    torch.testing.assert_close(apply_guidance(c, u, 1 + 1.5), 2.5 * c - 1.5 * u)
    # DiT's 3-channel quirk: channels 3.. are the conditional outputs, untouched.
    g = apply_guidance(c, u, 4.0, guidance_channels=3)
    torch.testing.assert_close(g[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    assert torch.equal(g[:, 3:], c[:, 3:])
    # Per-sample scale [B].
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(apply_guidance(c, u, s), u + s.view(-1, 1, 1, 1) * (c - u))
    # The process-aware wrapper never guides learned-variance channels.
    d = GaussianDiffusion(variance="learned_range")
    g = d.guided_output(c, u, 3.0)
    torch.testing.assert_close(g[:, :4], u[:, :4] + 3.0 * (c[:, :4] - u[:, :4]))
    assert torch.equal(g[:, 4:], c[:, 4:])
    with pytest.raises(ValueError):
        apply_guidance(c, u, 2.0, guidance_channels=0)
