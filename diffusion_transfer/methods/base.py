"""``DiffusionLightningBase``: what every method shares (optimizer, logging, sampling API, predict, grids).

A method subclasses it and provides two things:

- ``loss(batch) -> dict`` with a scalar ``loss`` (and any other scalars to log);
- ``generate(noise, labels, generators, **sampling) -> images`` in [-1, 1].

Everything else (optimizer over trainable parameters only, NaN guard, ``sample``, ``predict_step``,
validation loss and sample grids) lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..data.archive import DatasetError
from ..data.seeds import assign_labels
from ..errors import ConfigError
from ..io.checkpoint import GROUP_NORMS_KEY, check_fits, check_group_norms, group_norm_layout
from ..io.label_table import LabelTableFit, check_label_policy
from ..runtime import destroy_process_group_at_exit

#: Values of ``sample_precision``.
SAMPLE_PRECISIONS = ("trainer", "32", "bf16")


def _adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Default optimizer: AdamW, lr 1e-4, weight decay 0 (the DiT recipe)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class DiffusionLightningBase(L.LightningModule):
    """Base of every method: a denoiser ``self.net``, a noise process, and the shared training plumbing.

    Args:
        num_classes: number of classes of the data (0 = unconditional); linked from the data by the CLI.
        resolution: image (or latent) side in pixels.
        channels: image (or latent) channels.
        optimizer: a callable ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``); it only ever
            receives :meth:`trainable_parameters`. Default AdamW(lr=1e-4, weight_decay=0).
        lr_scheduler: optional ``optimizer -> scheduler`` callable, stepped every optimizer step.
        val_num_images: images in the sample grid logged at each validation (0 disables).
        val_seed: seed of the validation grid (fixed, so grids are comparable across steps).
        train_seed: seed of the training noise; step k on rank r uses a seed derived from (train_seed, k, r).
        sample_precision: precision of :meth:`sample` (predict, validation grids, the metrics' samples, replay
            banks): ``"trainer"`` follows the Trainer's precision plugin (autocast under ``bf16-mixed``; float32
            outside a Trainer), ``"32"`` always float32, ``"bf16"`` bf16 autocast even under a float32 Trainer.
        label_table: how the ``checkpoint`` file's label table meets this data's classes
            (:mod:`~diffusion_transfer.io.label_table`): ``strict`` (default: the classes must be the checkpoint's,
            so a wrong dataset fails at once instead of silently training on pre-trained rows that mean other
            classes), ``reuse`` (classes 0..N-1 take the checkpoint's first rows, the null row is kept; rows of
            classes the checkpoint lacks start fresh) or ``reinit`` (a fresh table). Fresh rows always train, even
            in an otherwise frozen net (:meth:`label_table_fitted`). DiffTuning defaults to ``reuse``, FineDiffusion
            to its paper's fresh table.
        compile: run the net through ``torch.compile`` (:attr:`denoiser`) in training and sampling. Measured on
            this project's 2-core CPU it was slower than eager bf16 for the U-Nets (``docs/results.md``), so off.
    """

    def __init__(
        self,
        num_classes: int = 0,
        resolution: int = 32,
        channels: int = 3,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        val_num_images: int = 16,
        val_seed: int = 0,
        train_seed: int = 0,
        sample_precision: str = "trainer",
        label_table: str = "strict",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if sample_precision not in SAMPLE_PRECISIONS:
            raise ConfigError(f"sample_precision must be one of {', '.join(SAMPLE_PRECISIONS)}, "
                              f"got {sample_precision!r}")
        self.label_table = check_label_policy(label_table)
        # Callables are kept as attributes, never read back from hparams: under LightningCLI the hparams
        # hold their parsed config, not the callable.
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.num_classes = num_classes
        self.resolution = resolution
        self.channels = channels
        self.val_num_images = val_num_images
        self.val_seed = val_seed
        self.train_seed = train_seed
        self.sample_precision = sample_precision
        self._compile = compile
        self._compiled: Any = None

    @property
    def denoiser(self) -> Any:
        """``self.net``, or its ``torch.compile`` wrapper (kept outside the module tree: no duplicate weights)."""
        if not self._compile:
            return self.net
        if self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.net))
        return self._compiled

    # ------------------------------------------------------------------------------------ to override

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """Training loss of a batch: a dict with scalar ``loss`` plus other scalars to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch)")

    def generate(self, noise: Tensor, labels: Tensor, generators: Sequence[torch.Generator],
                 **sampling: Any) -> Tensor:
        """Images ``[B, C, R, R]`` in [-1, 1] from starting noise ``[B, C, R, R]`` and labels ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement generate(noise, labels, generators)")

    # ------------------------------------------------------------------------------------ initial weights

    #: Path of the weights a ``fit`` starts from (a subclass sets it from its ``checkpoint`` argument).
    checkpoint: str | None = None
    _pretrained_loaded = False

    def load_weights(self, path: str) -> str:
        """Load the file at ``path`` into the net; return what it was (e.g. "official DiT"). Per method."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from a checkpoint file")

    #: How the last weights file's label table was fitted to this data (None: not loaded, or no table).
    label_table_fit: LabelTableFit | None = None

    def label_table_fitted(self, module: nn.Module, fit: LabelTableFit | None) -> None:
        """Record how ``load_weights`` fitted the label table of ``module``; make a table with fresh entries train.

        A table with fresh entries (``reinit``, or ``reuse`` with classes the file lacks) joins the trainable set
        even where the method freezes the net (DMP's frozen base, a PEFT selection without the table): frozen, those
        classes could never be learned. Methods whose net must stay frozen refuse fresh entries instead.
        """
        self.label_table_fit = fit
        if fit is None or not fit.fresh or fit.model is None:
            return
        table = module.get_parameter(fit.key)
        if not table.requires_grad:
            table.requires_grad_(True)
            rank_zero_info(f"{type(self).__name__}: the label table has {fit.fresh} fresh entries "
                           f"(label_table={fit.policy}), so it trains with the rest of the trainable set")

    def load_pretrained(self) -> None:
        """Load ``checkpoint`` once, when any stage sets up (fit, validate, test, predict).

        A ``--ckpt_path`` given to the command is restored after setup and so takes precedence; so do weights
        already restored from one of our checkpoints (``load_from_checkpoint``, a resumed fit).
        """
        if self.checkpoint and not self._pretrained_loaded:
            source = self.load_weights(self.checkpoint)
            self._pretrained_loaded = True
            rank_zero_info(f"loaded {source} weights from {self.checkpoint}")

    def setup(self, stage: str) -> None:
        # Every stage: `predict` with only an official checkpoint in the config (e.g. a replay bank drawn from
        # DiT-XL/2-256) must sample from those weights, not from a random initialisation.
        destroy_process_group_at_exit()  # under CPU DDP, before interpreter exit (see runtime.py)
        self.load_pretrained()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a checkpoint that does not fit is refused before any
        weight is copied (a ``--ckpt_path`` of another architecture, ``load_from_checkpoint``)."""
        trainer = self._trainer
        check_fits(self, state_dict, strict=strict, file=trainer.ckpt_path if trainer is not None else None)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _unet_group_norms(self) -> dict[str, tuple[int, int]]:
        """{name: (channels, groups)} of the GroupNorms inside this module's U-Nets (their rule is an option)."""
        from ..nets.unet import UNet

        return {f"{name}.{sub}": layout for name, m in self.named_modules() if isinstance(m, UNet)
                for sub, layout in group_norm_layout(m).items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Group counts are in no state dict: record them, so a model built with another rule is refused on load.
        layout = self._unet_group_norms()
        if layout:
            checkpoint[GROUP_NORMS_KEY] = {name: groups for name, (_, groups) in layout.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        check_group_norms(self._unet_group_norms(), checkpoint.get(GROUP_NORMS_KEY),
                          trainer.ckpt_path if trainer is not None else None)
        # Weights restored from one of our checkpoints supersede the initial ``checkpoint`` file: fitting a
        # module built by load_from_checkpoint must continue from them, not reload the pre-trained ones.
        self._pretrained_loaded = True

    # ------------------------------------------------------------------------------------ training

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (``requires_grad=True``); frozen ones never reach it."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _writes_logs_now(self) -> bool:
        """Whether the logger writes this step: Lightning's own test (private API; True if it moved)."""
        if self._trainer is None:
            return True
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # All randomness of a step (timesteps, noise, label dropout) comes from a seed derived from
        # (seed, step, rank): a resumed run then takes exactly the steps an uninterrupted one would, and the
        # global RNG (data order, user code) is left alone.
        # The micro-batch index separates the batches accumulated into one optimizer step.
        micro = batch_idx % self.trainer.accumulate_grad_batches if self._trainer is not None else 0
        with _seeded(_step_seed(self.train_seed, self.global_step, self.global_rank, micro), self.device):
            losses = self.loss(batch)
        loss = losses["loss"]
        self.require_finite(loss)
        # self.log costs about a millisecond per call; the logger only writes every log_every_n_steps, so
        # only those steps (and the progress bar's refresh) pay for it.
        if self._writes_logs_now():
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=_batch_size(batch))
        if self._trainer is None or self.trainer.progress_bar_callback is not None:
            self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=_batch_size(batch))
        return loss

    def require_finite(self, loss: Tensor, name: str = "loss",
                       hint: str = "lower the learning rate (model.init_args.optimizer.init_args.lr), prefer "
                                   "bf16-mixed to 16-mixed, or clip gradients (trainer.gradient_clip_val)") -> None:
        """Stop with the step number and a hint when ``loss`` is NaN or infinite (the same decision on every rank).

        Raises:
            FloatingPointError: the loss is not finite.
        """
        # Every rank must take the same decision, or the others would wait forever in the gradient all-reduce.
        non_finite = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            non_finite = self.trainer.strategy.reduce_boolean_decision(non_finite, all=False)
        if non_finite:
            raise FloatingPointError(f"{type(self).__name__}: the {name} is {loss.item()} at step {self.global_step}; "
                                     f"{hint}")

    # ------------------------------------------------------------------------------------ sampling

    def _labels_for(self, num_images: int, labels: Tensor | Sequence[int] | int | None) -> Tensor:
        if hasattr(labels, "tolist"):  # torch or numpy arrays
            labels = labels.tolist()
        return torch.tensor(assign_labels(num_images, self.num_classes, labels), dtype=torch.int64)

    @torch.no_grad()
    def sample(
        self,
        num_images: int | None = None,
        labels: Tensor | Sequence[int] | int | None = None,
        seeds: Tensor | Sequence[int] | None = None,
        seed: int = 0,
        **sampling: Any,
    ) -> Tensor:
        """Generate images in eval mode, each from its own seed.

        Args:
            num_images: how many (default: ``len(seeds)``).
            labels: None (classes in turn: 0, 1, ..., C-1, 0, ...), one class, or one label per image;
                ignored for unconditional models.
            seeds: one seed per image; default ``seed, seed + 1, ...``. Image i depends only on its seed
                and label, never on the batch it is drawn in.
            **sampling: method-specific options (e.g. ``sampler``, ``steps``, ``guidance_scale``).

        Returns:
            float ``[N, C, R, R]`` images in [-1, 1] (clamped), on the module's device; latent models
            return decoded images (see :meth:`to_images`).
        """
        if seeds is None:
            if num_images is None:
                raise ValueError("sample() needs num_images or seeds")
            seeds = list(range(seed, seed + num_images))
        seeds = [int(s) for s in (seeds.tolist() if hasattr(seeds, "tolist") else seeds)]
        label_tensor = self._labels_for(len(seeds), labels).to(self.device)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        shape = (self.channels, self.resolution, self.resolution)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        was_training = self.training
        self.eval()
        try:
            with self.sampling_precision_context():
                images = self.to_images(self.generate(noise, label_tensor, generators, **sampling))
        finally:
            self.train(was_training)
        return images.clamp(-1.0, 1.0)

    def sampling_precision_context(self) -> AbstractContextManager:
        """The autocast context that :meth:`sample` runs in (see ``sample_precision``)."""
        if self.sample_precision == "32":
            return torch.autocast(self.device.type, enabled=False)
        if self.sample_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self._trainer is not None:
            return self.trainer.precision_plugin.forward_context()
        return nullcontext()

    def to_images(self, samples: Tensor) -> Tensor:
        """Model-space samples -> images in [-1, 1]; identity in pixel space, VAE decoding for latents."""
        return samples

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``batch = (seeds [B], labels [B])`` -> ``{"images", "seeds", "labels"}`` for :class:`ImageWriter`."""
        seeds, labels = batch
        if self.num_classes > 0 and labels.numel() and int(labels.max()) >= self.num_classes:
            raise DatasetError(f"label {int(labels.max())} is outside the model's classes 0..{self.num_classes - 1}")
        images = self.sample(labels=labels if self.num_classes else None, seeds=seeds)
        return {"images": images, "seeds": seeds, "labels": labels}

    # ------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: Any, batch_idx: int, stage: str = "val") -> None:
        # A fixed seed per batch makes the validation loss comparable across steps.
        with _seeded(_step_seed(self.val_seed, batch_idx, self.global_rank, 0), self.device):
            losses = self.loss(batch)
        self.log_dict({f"{stage}/{k}": v.detach() for k, v in losses.items()}, sync_dist=True,
                      batch_size=_batch_size(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The validation loss on the held-out images, logged as ``test/*`` (sample metrics: GenerativeEvaluation)."""
        self.validation_step(batch, batch_idx, stage="test")

    def on_validation_epoch_end(self) -> None:
        if self.val_num_images <= 0 or self.trainer.sanity_checking:
            return
        folder = self.trainer.log_dir  # a collective call (it broadcasts): every rank must make it
        if self.trainer.is_global_zero:
            images = self.sample(self.val_num_images, seed=self.val_seed)
            self.log_image_grid(images, tag="val/samples", folder=folder)

    def log_image_grid(self, images: Tensor, tag: str, folder: str | None = None) -> Path | None:
        """Write ``images`` ([N, C, R, R] in [-1, 1]) as a PNG grid under ``folder/samples`` and to TensorBoard."""
        from torchvision.utils import make_grid

        from ..callbacks.writer import save_image_grid

        nrow = max(1, min(self.num_classes, 10)) if self.num_classes else 8
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            grid = make_grid(images.float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
            experiment.add_image(tag, (grid + 1) / 2, self.global_step)
        if folder is None:
            return None
        return save_image_grid(images, Path(folder) / "samples" / f"step{self.global_step:07d}.png", nrow)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG (CPU, and ``device`` if it is a GPU) inside the block; restore it afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed for (seed, step, rank, micro-batch), decorrelated by a splitmix-style mix."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB
             + micro * 0xD6E8FEB86659FD93) % (1 << 64)
    value ^= value >> 31
    return value % (1 << 63)


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0])

