"""``TrainableEMA``: exponential moving average of the *trainable* parameters only.

Lightning's ``EMAWeightAveraging`` deep-copies the whole module (frozen backbones, teachers, metric
networks) and averages its buffers every step; for parameter-efficient methods that is most of the
memory and none of the point. This callback keeps one shadow tensor per parameter with
``requires_grad=True`` (or per parameter of one named submodule, e.g. a distilled generator).

Two schedules:

- ``decay``: shadow <- decay * shadow + (1 - decay) * param every optimizer step (DiT: 0.9999, the
  shadow starts equal to the model).
- ``halflife_kimg`` (EDM): decay = 0.5 ** (images_per_step / halflife_images), where the half-life in
  images is ``halflife_kimg * 1000``, capped during ramp-up at ``rampup_ratio * images_seen``.

Checkpoints mirror ``WeightAveraging``: ``state_dict`` holds the EMA weights, so
``load_from_checkpoint`` and ``predict --ckpt_path`` sample with EMA weights, and the raw weights sit
under ``"ema_raw_state"`` so that ``fit --ckpt_path`` resumes training the raw weights with the EMA
intact. During fit, validation runs with the EMA weights swapped in; at the end of training the EMA
weights are left in the module so that sampling right after ``fit`` uses them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

RAW_STATE_KEY = "ema_raw_state"


class TrainableEMA(L.Callback):
    """EMA over trainable parameters (see module docstring).

    Args:
        decay: per-step decay in ``decay`` mode (ignored when ``halflife_kimg`` is set).
        halflife_kimg: EDM half-life in thousands of images; switches to half-life mode.
        rampup_ratio: EDM ramp-up; the half-life is at most ``rampup_ratio * images_seen``. None disables.
        submodule: dotted name of the submodule to average (default: every trainable parameter).
        update_every_n_steps: update interval in optimizer steps (the decay is applied once per update, for the
            images seen since the previous update; with several optimizers, e.g. DiffInstruct's two, global_step
            advances by more than one per batch).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        halflife_kimg: float | None = None,
        rampup_ratio: float | None = 0.05,
        submodule: str | None = None,
        update_every_n_steps: int = 1,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"TrainableEMA: decay must be in [0, 1], got {decay}")
        if halflife_kimg is not None and halflife_kimg <= 0:
            raise ValueError(f"TrainableEMA: halflife_kimg must be positive, got {halflife_kimg}")
        self.decay = decay
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio
        self.submodule = submodule
        self.update_every_n_steps = update_every_n_steps
        self.shadow: dict[str, Tensor] = {}
        self.images_seen = 0
        self.num_updates = 0
        self._pending_images = 0  # images since the last update
        self._backup: dict[str, Tensor] | None = None  # raw weights while the EMA is swapped in
        self._last_step = -1

    # -------------------------------------------------------------------------------- bookkeeping

    def tracked(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        """The averaged parameters by their ``state_dict`` names."""
        prefix = f"{self.submodule}." if self.submodule else ""
        return {name: p for name, p in pl_module.named_parameters()
                if p.requires_grad and name.startswith(prefix)}

    def current_decay(self, images_per_step: int) -> float:
        """The decay applied at the next update, given the images of one optimizer step (all devices)."""
        if self.halflife_kimg is None:
            return self.decay
        halflife = self.halflife_kimg * 1000.0
        if self.rampup_ratio is not None:
            halflife = min(halflife, self.images_seen * self.rampup_ratio)
        return 0.5 ** (images_per_step / max(halflife, 1e-8))

    @property
    def swapped(self) -> bool:
        return self._backup is not None

    def _swap(self, pl_module: L.LightningModule) -> None:
        """Exchange live parameter values and shadows (in place, no extra copy of the model)."""
        params = self.tracked(pl_module)
        with torch.no_grad():
            if self._backup is None:
                self._backup = {n: params[n].detach().clone() for n in self.shadow}
                for n, value in self.shadow.items():
                    params[n].copy_(value)
            else:
                for n, value in self._backup.items():
                    params[n].copy_(value)
                self._backup = None

    # -------------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's setup (which may load pre-trained weights) and after a resumed checkpoint
        # restored the shadows (on_load_checkpoint), so the EMA starts equal to the model that trains.
        # Only optimizer steps taken from now on update the EMA (with gradient accumulation, global_step
        # stays at its current value for the first micro-batches).
        self._last_step = trainer.global_step
        if self.shadow:
            # Restored shadows were copied before the strategy moved the module to its device.
            params = self.tracked(pl_module)
            self.shadow = {n: v.to(params[n].device) for n, v in self.shadow.items()}
            if self._backup is not None:
                self._backup = {n: v.to(params[n].device) for n, v in self._backup.items()}
        else:
            params = self.tracked(pl_module)
            if not params:
                raise ValueError("TrainableEMA: the module has no trainable parameters to average"
                                 + (f" under '{self.submodule}'" if self.submodule else ""))
            self.shadow = {n: p.detach().clone() for n, p in params.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps, so gradient accumulation and manual optimization
        # (several optimizers) update once per step.
        step = trainer.global_step
        if step == self._last_step:
            return
        previous, self._last_step = self._last_step, step
        images = _batch_size(batch) * trainer.world_size * trainer.accumulate_grad_batches
        self.images_seen += images
        self._pending_images += images
        # Due when a multiple of the interval was passed (global_step may advance by several per batch).
        if step // self.update_every_n_steps == previous // self.update_every_n_steps:
            return
        beta = self.current_decay(self._pending_images)
        self._pending_images = 0
        params = self.tracked(pl_module)
        names = list(self.shadow)
        with torch.no_grad():
            torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - beta)
        self.num_updates += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow and not self.swapped and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swapped and trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swapped:  # a previous fit() left EMA weights in the module: train the raw weights again
            self._swap(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow and not self.swapped:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self.shadow:
            return
        state = checkpoint["state_dict"]
        params = self.tracked(pl_module)
        raw = self._backup if self._backup is not None else {n: params[n].detach() for n in self.shadow}
        checkpoint[RAW_STATE_KEY] = {n: v.clone() for n, v in raw.items()}
        for n, value in self.shadow.items():
            state[n] = value.clone()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Called after the module received checkpoint["state_dict"] (the EMA weights). Only a resumed fit
        # wants the raw weights back; predict/validate/test from a checkpoint must keep sampling with EMA.
        raw = checkpoint.get(RAW_STATE_KEY)
        if raw is None or trainer.state.fn != "fit":
            return
        params = self.tracked(pl_module)
        with torch.no_grad():
            self.shadow = {n: params[n].detach().clone() for n in raw}
            for n, value in raw.items():
                params[n].copy_(value)
        self._backup = None

    def state_dict(self) -> dict[str, Any]:
        return {"images_seen": self.images_seen, "num_updates": self.num_updates, "last_step": self._last_step,
                "pending_images": self._pending_images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images_seen = state_dict["images_seen"]
        self.num_updates = state_dict["num_updates"]
        self._last_step = state_dict["last_step"]
        self._pending_images = state_dict.get("pending_images", 0)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"TrainableEMA: cannot tell the batch size of a {type(batch).__name__}")
