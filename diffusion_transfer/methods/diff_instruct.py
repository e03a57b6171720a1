"""``DiffInstruct``: data-free distillation of an EDM teacher into a one-step generator (Luo et al., NeurIPS 2023).

Spec: ``papers/diff_instruct.md``. Three networks: the frozen teacher denoiser D_q (``net``), a fake-score denoiser
D_φ (``fake_score``) and a generator G_θ (``generator``), both initialised from the teacher. The default generator is
the teacher applied once at σ_init (spec 2.2), on z ~ N(0, I) of the image shape:

    G_θ(z, c) = D_θ(σ_init z; σ_init, c)

Each iteration (spec 2.3; ln σ ~ N(P_mean, P_std²) = N(-1.2, 1.2²), n ~ N(0, I), sg = stop-gradient):

    A. x = sg(G_θ(z, c)),  (x', a) = augment(x)                   generator in eval mode
       L_A = sgls · mean_batch Σ_pixels λ(σ) (D_φ(x' + σn; σ, c, a) - x')²    (edm_loss)           Adam step on φ
    B. x = G_θ(z', c),  x_t = sg(x) + σn                          generator in train mode
       L_B = ls · mean_batch Σ_pixels sg(D_φ(x_t; σ, c) - D_q(x_t; σ, c)) ⊙ x                       Adam step on θ

With s(x; σ) = (D(x; σ) - x) / σ², ∇_θ L_B = E[σ² (s_p(x_t; σ) - s_q(x_t; σ)) ∂x/∂θ]: the gradient of the integral
KL E_σ[σ² KL(p_θ,σ ‖ q_σ)] with the fake score held fixed (spec 2.4). In B both score nets run in train mode with
one shared dropout mask (torch's RNG is rewound between the two calls). NaN/Inf gradients become 0 / ±1e5 before
each step (EDMDiffusion's hook); both Adams have betas (0, 0.999). The EMA of the generator is
:class:`~diffusion_transfer.callbacks.TrainableEMA` with ``submodule: generator`` (EDM half-life with ramp-up).

Only ``precond: edm`` is accepted (phase B's σ law must be LN(P_mean, P_std²), as in the paper's code). Under DDP the
module switches on ``find_unused_parameters`` (each phase leaves the other network without a gradient).

Phase A sums over pixels as the original does (Adam's eps then meets the same gradient scale); ``augment`` is EDM's
non-leaking augmentation (:class:`~diffusion_transfer.diffusion.augment.AugmentPipe`, p = 0.12 when the teacher has
``augment_dim`` 9, spec 2.3 and 6), whose 9-d labels reach the fake score. Phase B passes no augment labels (= zeros).

Departure: label dropout is off in all three nets (the generator must always follow its label).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..callbacks.ema import TrainableEMA
from ..diffusion.augment import AUGMENT_DIM, AugmentPipe
from ..diffusion.edm import EDM, Denoiser, Precond, make_precond
from ..errors import ConfigError
from ..io.checkpoint import CKPT_FIX, CheckpointError, safe_torch_load
from ..io.label_table import LabelTableFit
from ..io.unet_checkpoint import load_unet_checkpoint
from ..nets.generator import DCGANGenerator
from .base import _adamw, _seeded, _step_seed
from .edm import EDMDiffusion, check_same_precond, edm_loss

ONE_STEP = "one-step"
GENERATORS = ("teacher", "dcgan")
SCORE_DROPOUT = ("shared", "eval")
#: Phase A's augmentation probability with a teacher that has augment labels (the original's ``--augment``).
AUGMENT_P = 0.12


class OneStepGenerator(nn.Module):
    """G(z, c) = D(σ_init z; σ_init, c): a denoiser applied once at σ_init to z ~ N(0, I) (spec 2.2).

    Args:
        net: an EDM U-Net (a copy of the teacher's). process: its :class:`EDM` process (the preconditioning).
        init_sigma: σ_init, the input scale and the σ the net is conditioned on; fixed for the model's life.
    """

    def __init__(self, net: nn.Module, process: EDM, init_sigma: float) -> None:
        super().__init__()
        self.net, self.process, self.init_sigma = net, process, float(init_sigma)
        self.latent_shape = (net.in_channels, net.img_resolution, net.img_resolution)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images [B, C, R, R] from latents z [B, C, R, R] and labels [B] (None: unconditional)."""
        return self.process.denoise(self.net, self.init_sigma * z, self.init_sigma, labels)


def ikl_surrogate_loss(x: Tensor, teacher: Denoiser, fake_score: Denoiser, precond: Precond, ls: float = 1.0,
                       shared_randomness: bool = True, sigma: Tensor | None = None,
                       noise: Tensor | None = None) -> dict[str, Tensor]:
    """Phase B: L = ls · mean_batch Σ_pixels sg(D_φ(x_t; σ) - D_q(x_t; σ)) ⊙ x, x_t = sg(x) + σn (spec 2.3-2.4).

    Args:
        x: generator samples [B, ...] with their graph: the gradient reaches θ only through this factor.
        teacher / fake_score: denoisers ``(x_t, σ [B]) -> D`` (D_q, D_φ), evaluated without a graph.
        precond: its training law draws σ when ``sigma`` is None (EDM: ln σ ~ N(-1.2, 1.2²)).
        ls: the paper's ``ls``, a constant factor (an fp16 loss scale; Adam is blind to it).
        shared_randomness: rewind torch's RNG (CPU and x's GPU) between the two calls, so that dropout draws one mask
            for both nets (the paper's choice); False draws independent masks.
        sigma: [B] noise levels; noise: n with x's shape. Drawn from torch's global RNG when None.

    Returns:
        ``loss`` (scalar), ``sigma`` [B].
    """
    if sigma is None:
        sigma = precond.sample_sigma(x.shape[0], x.device)
    if noise is None:
        noise = torch.randn_like(x)
    x_t = x.detach() + sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) * noise
    with torch.no_grad():
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=shared_randomness):
            d_real = teacher(x_t, sigma)
        d_fake = fake_score(x_t, sigma)
    loss = ls * ((d_fake - d_real).to(x.dtype) * x).flatten(1).sum(1).mean()
    return {"loss": loss, "sigma": sigma}


@contextmanager
def _modes(*modules: tuple[nn.Module, bool]) -> Iterator[None]:
    """Set ``module.train(mode)`` for each pair inside the block; restore the previous modes afterwards."""
    before = [m.training for m, _ in modules]
    for module, mode in modules:
        module.train(mode)
    try:
        yield
    finally:
        for (module, _), mode in zip(modules, before):
            module.train(mode)


class DiffInstruct(EDMDiffusion):
    """Diff-Instruct: a generator trained by the IKL gradient of a frozen EDM teacher, without data.

    The data module only supplies shapes and labels (its images are never read). ``max_steps`` counts optimizer
    steps: two per iteration.

    Args:
        arch / arch_overrides: the teacher's U-Net (as :class:`EDMDiffusion`); fake score and generator copy it.
        checkpoint: the teacher: an :class:`EDMDiffusion` ``.ckpt`` or an official EDM ``.pkl`` (its ``ema``
            network). Loaded at setup (validate / test / predict: at their start, and not at all after a
            ``--ckpt_path`` of ours), then copied into the fake score and the teacher-shaped generator. Required to
            ``fit``; sampling from our ``.ckpt`` needs it not (the teacher is in the checkpoint). A conditional teacher
            serves data of fewer classes with ``label_table: reuse`` (its first classes); new classes are refused,
            since a frozen teacher cannot learn them.
        precond: must be ``edm`` (phase B draws σ from LN(P_mean, P_std²); the paper's code is EDM-only).
        init_sigma: σ_init (paper flag ``--init_sigma``; README 1.0). Stored in checkpoints; sampling refuses another.
        generator: ``teacher`` (the teacher applied once at σ_init, the paper's) or ``dcgan`` (a
            :class:`~diffusion_transfer.nets.generator.DCGANGenerator`, randomly initialised: the paper's "any
            differentiable generator" scenario). Subclasses may override :meth:`build_generator`.
        generator_overrides: ``DCGANGenerator`` arguments (``z_dim``, ``base_channels``, ...).
        lr: Adam lr of the fake score (``--lr``; upstream README 1e-5). glr: Adam lr of the generator (``--glr``, 1e-5).
        betas / eps: of both Adams ((0, 0.999), 1e-8).
        ls / sgls: constant factors on the generator / fake-score losses (``--ls`` / ``--sgls``, 1).
        score_dropout: ``shared`` (both score nets in train mode, one dropout mask: the paper's) or ``eval``
            (dropout off in both: a deviation).
        augment_p: EDM's augmentation of the generator samples in phase A (fed to the fake score's augment input).
            None (default): 0.12 when the teacher net has ``augment_dim`` 9 (the paper's), else off; 0: off.
        sampler: ``one-step`` (the generator), or ``heun`` / ``euler``: the teacher's EDM sampler with
            ``sample_steps`` (18 = 35 evaluations) and the other :class:`EDMDiffusion` sampling options.
        **kwargs: :class:`EDMDiffusion` arguments (``precond``, ``sigma_data``, ``P_mean``, ``P_std``, the sampling
            grid, ``guidance_scale``, ``allow_tf32``) and :class:`DiffusionLightningBase` ones (``num_classes``, ...).
    """

    def __init__(
        self,
        arch: str = "ddpmpp-cifar10",
        arch_overrides: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        init_sigma: float = 1.0,
        generator: str = "teacher",
        generator_overrides: dict[str, Any] | None = None,
        lr: float = 1e-5,
        glr: float = 1e-5,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        ls: float = 1.0,
        sgls: float = 1.0,
        score_dropout: str = "shared",
        augment_p: float | None = None,
        sampler: str = ONE_STEP,
        sample_steps: int = 18,
        **kwargs: Any,
    ) -> None:
        for name in ("optimizer", "lr_scheduler", "label_dropout"):
            if kwargs.get(name) not in (None, 0.0) and kwargs[name] is not _adamw:
                raise ConfigError(f"DiffInstruct does not take {name}: it has two Adams (lr, glr, betas, eps) and "
                                  "no label dropout")
            kwargs.pop(name, None)
        if kwargs.get("precond", "edm") != "edm":
            # Phase B draws σ from the precond's training law, which must be LN(P_mean, P_std²) (spec 2.3, 3.1:
            # --precond stays edm); a VP/VE teacher would also get the wrong c_skip/c_out in the generator.
            raise ConfigError(f"DiffInstruct needs precond: edm (the EDM-preconditioned teacher of the paper), not "
                              f"{kwargs['precond']!r}")
        if sampler not in (ONE_STEP, "heun", "euler"):
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {ONE_STEP}, heun, euler")
        if generator not in GENERATORS:
            raise ConfigError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
        if score_dropout not in SCORE_DROPOUT:
            raise ConfigError(f"unknown score_dropout {score_dropout!r}; choose one of {', '.join(SCORE_DROPOUT)}")
        if not init_sigma > 0:
            raise ConfigError(f"init_sigma must be positive, got {init_sigma}")
        super().__init__(arch, arch_overrides, checkpoint, sampler="heun" if sampler == ONE_STEP else sampler,
                         sample_steps=sample_steps, augment_p=0.0 if augment_p is None else augment_p, **kwargs)
        if augment_p is None and getattr(self.net, "augment_dim", 0) == AUGMENT_DIM:
            self.augment_pipe = AugmentPipe(AUGMENT_P)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.net.requires_grad_(False)  # the teacher D_q (each use sets its mode)
        self.fake_score = copy.deepcopy(self.net).requires_grad_(True)
        self.init_sigma = float(init_sigma)
        self.generator = self.build_generator(generator, dict(generator_overrides or {}))
        self.lr, self.glr, self.betas, self.eps, self.ls, self.sgls = lr, glr, tuple(betas), eps, ls, sgls
        self.score_dropout = score_dropout
        self.sampling["sampler"] = sampler

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher U-Net (registered as ``net``, so our ``.ckpt`` is again a valid teacher file)."""
        return self.net

    def build_generator(self, name: str, overrides: dict[str, Any]) -> nn.Module:
        """The generator: ``module(z [B, *latent_shape], labels [B] | None) -> images`` with ``latent_shape``."""
        if name == "dcgan":
            return DCGANGenerator(self.resolution, self.channels, self.num_classes, **overrides)
        if overrides:
            raise ConfigError("generator_overrides only apply to generator: dcgan (the teacher-shaped generator is "
                              "shaped by arch / arch_overrides)")
        return OneStepGenerator(copy.deepcopy(self.net).requires_grad_(True), self.process, self.init_sigma)

    # ------------------------------------------------------------------------------------ teacher and checkpoints

    def load_weights(self, path: str) -> str:
        """Load the teacher (our ``.ckpt`` or an EDM ``.pkl``), check it is an EDM denoiser at this resolution, and
        copy it into the fake score and the teacher-shaped generator."""
        # Strict: keys and shapes must match arch / arch_overrides, the label input under label_table.
        report = load_unet_checkpoint(self.net, path, label_table=self.label_table)
        self.label_table_fitted(self.net, report.label_table)
        fix = "Diff-Instruct needs an EDM teacher: an EDMDiffusion .ckpt or an official edm-*.pkl"
        if report.source.startswith("ddpm"):
            raise CheckpointError(f"{path} is a DDPM (ε-prediction) U-Net, not an EDM denoiser. {fix}")
        resolution = None
        if report.network is not None:
            check_same_precond(report.network, self.process.precond, path)
            resolution = report.network.model_kwargs.get("img_resolution")
        elif report.source == "lightning":
            hparams = safe_torch_load(path, what="a checkpoint", fix=CKPT_FIX, mmap=True).get("hyper_parameters", {})
            if "precond" not in hparams:
                raise CheckpointError(f"{path} is not a checkpoint of an EDM denoiser (no precond in its "
                                      f"hyper-parameters). {fix}")
            edm_constants = {k: hparams[k] for k in ("sigma_data", "P_mean", "P_std") if k in hparams}
            constants = {**(edm_constants if hparams["precond"] == "edm" else {}),
                         **(hparams.get("precond_kwargs") or {})}
            check_same_precond(make_precond(hparams["precond"], **constants), self.process.precond, path)
            resolution = hparams.get("resolution")
        elif report.source == "state_dict":
            rank_zero_warn(f"DiffInstruct: {path} is a bare state dict, so neither its preconditioning (this model "
                           f"uses {self.process.precond}) nor its resolution ({self.resolution}x{self.resolution} "
                           "here) can be verified; make sure the teacher is an EDM denoiser of this resolution, or "
                           "use an EDMDiffusion .ckpt or an official edm-*.pkl")
        if resolution is not None and int(resolution) != self.resolution:
            raise CheckpointError(f"the teacher {path} works at {resolution}x{resolution} but the generator makes "
                                  f"{self.resolution}x{self.resolution} images; use data of the teacher's resolution")
        self.fake_score.load_state_dict(self.net.state_dict())
        if isinstance(self.generator, OneStepGenerator):
            self.generator.net.load_state_dict(self.net.state_dict())
        return f"{report.source} teacher"

    def label_table_fitted(self, module: nn.Module, fit: LabelTableFit | None) -> None:
        """A teacher restricted to its first classes is fine; fresh classes are not: the teacher is frozen and no
        data trains it, so their scores would be noise that the generator learns to match.

        Raises:
            ConfigError: the fitted label input has fresh entries (``reinit``, or more classes than the teacher).
        """
        if fit is not None and fit.fresh:
            teacher = fit.file.describe() if fit.file is not None else "no classes (unconditional)"
            raise ConfigError(f"DiffInstruct distils a frozen teacher, which cannot learn new classes: the teacher has "
                              f"{teacher}, this model {fit.model.describe()} (label_table={fit.policy}); use "
                              "label_table reuse with at most the teacher's classes (its first ones), or strict")
        super().label_table_fitted(module, fit)

    #: True while the teacher file waits for the start of a validate / test / predict run (see :meth:`setup`).
    _teacher_deferred = False

    def load_pretrained(self) -> None:
        if not self._teacher_deferred:
            super().load_pretrained()

    def setup(self, stage: str) -> None:
        # A fit loads the teacher file now (on_fit_start requires it; a resumed fit's --ckpt_path overrides it
        # afterwards). Validate / test / predict under a Trainer wait for their start hook: a --ckpt_path of ours
        # is restored after setup and holds the teacher, so the teacher file is then neither read nor required.
        self._teacher_deferred = self._trainer is not None and stage != "fit"
        super().setup(stage)  # TF32 setting, then the teacher from `checkpoint` (unless deferred)
        if stage == "fit" and self._trainer is not None:
            self._require_unused_parameter_search()
        with torch.no_grad(), _modes((self.generator, False)):
            probe = self.generator(torch.zeros(1, *self.generator.latent_shape, device=self.device),
                                   torch.zeros(1, dtype=torch.int64, device=self.device) if self.num_classes else None)
        if tuple(probe.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ConfigError(f"the generator makes {list(probe.shape[1:])} images but the teacher works on "
                              f"{[self.channels, self.resolution, self.resolution]}")
        for callback in self.trainer.callbacks if self._trainer is not None else []:
            if isinstance(callback, TrainableEMA) and callback.submodule != "generator":
                if callback.submodule is not None:
                    raise ConfigError(f"DiffInstruct averages the generator only: set ema.submodule to 'generator', "
                                      f"not {callback.submodule!r}")
                callback.submodule = "generator"
                rank_zero_info("DiffInstruct: the EMA averages the generator only (ema.submodule = generator)")

    def _require_unused_parameter_search(self) -> None:
        """Make DDP tolerate parameters without a gradient: phase A leaves the generator without one, phase B the
        fake score. Lightning's DDPStrategy wraps the module after ``setup``, passing ``_ddp_kwargs`` to
        DistributedDataParallel, so setting ``find_unused_parameters`` there still takes effect."""
        strategy = self.trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            return
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if not isinstance(ddp_kwargs, dict) or ddp_kwargs.get("static_graph"):
            raise ConfigError("DiffInstruct under DDP needs find_unused_parameters=True and no static graph (each "
                              "phase leaves the other network's parameters without a gradient); set "
                              "trainer.strategy: ddp_find_unused_parameters_true")
        if not ddp_kwargs.get("find_unused_parameters"):
            ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info("DiffInstruct: DDP set to find_unused_parameters=True (each phase leaves the other "
                           "network's parameters without a gradient)")

    def _load_deferred_teacher(self) -> None:
        # After a --ckpt_path restore (on_load_checkpoint marks the weights as loaded) this reads nothing.
        self._teacher_deferred = False
        self.load_pretrained()

    def on_validation_start(self) -> None:
        self._load_deferred_teacher()

    def on_test_start(self) -> None:
        self._load_deferred_teacher()

    def on_predict_start(self) -> None:
        self._load_deferred_teacher()

    def on_fit_start(self) -> None:
        if not self._pretrained_loaded:
            raise CheckpointError("DiffInstruct needs a teacher to fit: set model.init_args.checkpoint to an "
                                  "EDMDiffusion .ckpt (e.g. from configs/edm/shapes.yaml) or an official edm-*.pkl")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["init_sigma"] = self.init_sigma

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("init_sigma")
        if stored is not None and float(stored) != self.init_sigma:
            rank_zero_warn(f"DiffInstruct: the checkpoint's generator was trained with init_sigma={stored}; using "
                           f"it instead of the configured {self.init_sigma} (a generator cannot change σ_init)")
            self.init_sigma = float(stored)
            if isinstance(self.generator, OneStepGenerator):
                self.generator.init_sigma = self.init_sigma
            self.hparams["init_sigma"] = self.init_sigma

    # ------------------------------------------------------------------------------------ the two phases

    def draw_latent(self, n: int) -> Tensor:
        """n latents z ~ N(0, I) of the generator's ``latent_shape``, from torch's global RNG."""
        return torch.randn(n, *self.generator.latent_shape, device=self.device)

    def fake_score_loss(self, labels: Tensor | None, n: int) -> Tensor:
        """Phase A: sgls times the EDM loss of D_φ on n fresh generator samples (eval mode, no graph), augmented
        with ``augment_p``, summed over pixels and averaged over the batch (spec 2.3 A.5)."""
        with torch.no_grad(), _modes((self.generator, False)):
            x = self.generator(self.draw_latent(n), labels)
        x, augment_labels = self.augment(x)
        with _modes((self.fake_score, True)):
            return self.sgls * edm_loss(self.fake_score, self.process, x, labels, augment_labels,
                                        reduction="sum")["loss"]

    def generator_loss(self, labels: Tensor | None, n: int) -> Tensor:
        """Phase B: the IKL surrogate on n fresh generator samples (train mode, with their graph)."""
        score_mode = self.score_dropout == "shared"
        with _modes((self.generator, True), (self.net, score_mode), (self.fake_score, score_mode)):
            x = self.generator(self.draw_latent(n), labels)
            return ikl_surrogate_loss(
                x, lambda x_t, s: self.process.denoise(self.net, x_t, s, labels),
                lambda x_t, s: self.process.denoise(self.fake_score, x_t, s, labels), self.process.precond,
                ls=self.ls, shared_randomness=score_mode)["loss"]

    def _labels(self, batch: Any) -> tuple[Tensor | None, int]:
        """(labels or None, batch size) of a data batch; its images are never read (data-free)."""
        images, labels = batch
        return (labels.to(self.device) if self.num_classes else None), int(images.shape[0])

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """Both phase losses without a step (validation). Neither tracks quality (spec 7.8): watch FID."""
        labels, n = self._labels(batch)
        fake_score_loss = self.fake_score_loss(labels, n)
        return {"loss": fake_score_loss, "fake_score_loss": fake_score_loss,
                "generator_loss": self.generator_loss(labels, n)}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_score, opt_generator = self.optimizers()
        labels, n = self._labels(batch)
        losses = {}
        # All randomness of an iteration comes from (train_seed, step, rank), as in DiffusionLightningBase.
        with _seeded(_step_seed(self.train_seed, self.global_step, self.global_rank, 0), self.device):
            for name, optimizer, compute in (("fake_score_loss", opt_score, self.fake_score_loss),
                                             ("generator_loss", opt_generator, self.generator_loss)):
                with self.toggled_optimizer(optimizer):
                    loss = compute(labels, n)
                    # Only the learning rates: Lightning refuses gradient_clip_val under manual optimisation.
                    self.require_finite(loss, name, "lower the learning rates (model.init_args.lr / glr)")
                    optimizer.zero_grad(set_to_none=True)
                    self.manual_backward(loss)
                    optimizer.step()  # on_before_optimizer_step replaces NaN/Inf gradients first
                losses[name] = loss.detach()
        if self._writes_logs_now():
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        def adam(module: nn.Module, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr, betas=self.betas,
                                    eps=self.eps)

        return [adam(self.fake_score, self.lr), adam(self.generator, self.glr)]

    # ------------------------------------------------------------------------------------ sampling

    def generate(self, noise: Tensor, labels: Tensor, generators: Sequence[torch.Generator],
                 **sampling: Any) -> Tensor:
        """One-step samples G(z, c) (z = ``noise`` when it has the latent's shape, else drawn from ``generators``);
        with ``sampler`` ``heun`` / ``euler``, the teacher's EDM sampling (:meth:`EDMDiffusion.generate`).
        ``init_sigma``, if given, must be the trained value."""
        init_sigma = sampling.pop("init_sigma", None)
        if init_sigma is not None and float(init_sigma) != self.init_sigma:
            raise ConfigError(f"this generator was trained with init_sigma={self.init_sigma} and cannot be sampled "
                              f"with {init_sigma}: σ_init is part of the model")
        if sampling.get("sampler", self.sampling["sampler"]) != ONE_STEP:
            return super().generate(noise, labels, generators, **sampling)
        unknown = set(sampling) - set(self.sampling) - {"progress"}
        if unknown:
            raise TypeError(f"unknown sampling options {sorted(unknown)}; known: {sorted(self.sampling)}")
        shape = tuple(self.generator.latent_shape)
        z = noise if tuple(noise.shape[1:]) == shape else torch.stack(
            [torch.randn(shape, generator=g) for g in generators]).to(noise.device)
        return self.generator(z, labels if self.num_classes else None)

