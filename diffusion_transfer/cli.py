"""``diffusion-transfer fit|validate|test|predict --config FILE``: LightningCLI over every method and datamodule.

- ``--model`` picks any :class:`DiffusionLightningBase` subclass by short name (``Diffusion``, ...), and
  ``--data`` any LightningDataModule (``DiffusionDataModule``).
- ``num_classes``, ``resolution`` and ``channels`` are read from the data and linked into the model.
- The optimizer is a model argument (``--model.init_args.optimizer``); the CLI's own ``--optimizer`` is
  off because it would optimise frozen parameters too and replace the methods' ``configure_optimizers``.
- ``--ema.*`` configures the always-on :class:`TrainableEMA`; ``--writer.*`` the predict
  :class:`ImageWriter` (``--writer.output_dir``, ``--writer.zip_path``); ``--metrics.*`` the sample metrics
  of :class:`GenerativeEvaluation` (off until ``--metrics.feature_network`` is set).
- Any LightningModule that takes ``num_classes``, ``resolution`` and ``channels`` can be the model: the
  methods, and :class:`~diffusion_transfer.metrics.FeatureClassifier` (the feature network for FID).
- Every file a run writes lives under its run directory ``--trainer.default_root_dir``: relative output paths
  (``FinalCheckpoint``'s, ``--writer.*``, ``--metrics.output``) are taken inside it
  (:func:`~diffusion_transfer.callbacks.run_dir.in_run_dir`).
- Options are never abbreviated, and an unknown option or config key is one line naming the closest known one
  (:class:`DiffusionArgumentParser`).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import NoReturn

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

# Imported so that short class names resolve (jsonargparse only sees subclasses that exist).
from . import methods  # noqa: F401
from .callbacks import FinalCheckpoint, GenerativeEvaluation, ImageWriter, TrainableEMA
from .data import DatasetError
from .data.datamodule import DiffusionDataModule  # noqa: F401
from .errors import ConfigError
from .io.atomic import AtomicCheckpointIO
from .io.checkpoint import CKPT_FIX, CheckpointError, safe_torch_load
from .metrics import FeatureClassifier, MetricError  # noqa: F401
from .runtime import default_precision

# --ckpt_path resumes one of our own runs; released weights (DiT, FineDiffusion, DMP, EDM, pytorch-ddpm files) are
# read by the model's own loader, which knows their layouts and accepts their stored training arguments as data.
RESUME_FIX = (f"{CKPT_FIX}; --ckpt_path takes a .ckpt of this library, so pass released weights (a DiT, "
              "FineDiffusion, DMP, EDM or pytorch-ddpm file) as --model.init_args.checkpoint instead")


class DiffusionArgumentParser(LightningArgumentParser):
    """The CLI's parser: options are never abbreviated (``--trainer.max_step`` is not ``--trainer.max_steps``), and its
    errors are short. An unknown option, on the command line or as a key of a ``--config`` file, is one line naming
    the closest known option; any other error is jsonargparse's message without the usage text. Exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # a nested parser raises to its parent; debug mode keeps the traceback
        text = _unknown_option(self, message, ex) or f"{message}\n(--help lists the options)"
        sys.stderr.write(f"diffusion-transfer: error: {text}\n")
        self.exit(2)


class DiffusionCLI(LightningCLI):
    """LightningCLI with data -> model links and the EMA / image-writer option groups."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "resolution", "channels"):
            parser.link_arguments("data", f"model.init_args.{name}", compute_fn=attrgetter(name),
                                  apply_on="instantiate")
        parser.add_lightning_class_args(TrainableEMA, "ema")
        parser.add_lightning_class_args(ImageWriter, "writer")
        parser.add_lightning_class_args(GenerativeEvaluation, "metrics")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Remember the model options the command line sets: they must win over a --ckpt_path's hyper-parameters.
        tokens = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
        self._command_line_model_options = _model_options(tokens)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning lays the hyper-parameters stored in a ``--ckpt_path`` over the whole model config; keep the model
        options given on the command line on top (predict's ``sampler``/``sample_steps``, ``checkpoint null``...)."""
        subcommand = self.config.get("subcommand")
        names = getattr(self, "_command_line_model_options", set())
        if not subcommand or not names:
            return self._checked_parse_ckpt_path()
        given = self.config[subcommand].get("model.init_args")
        kept = {name: given[name] for name in names if given is not None and name in given}
        self._checked_parse_ckpt_path()
        for name, value in kept.items():
            self.config[subcommand][f"model.init_args.{name}"] = value

    def _checked_parse_ckpt_path(self) -> None:
        """Lightning reads a ``--ckpt_path``'s hyper-parameters with a bare ``torch.load``, which checks no CRC: a
        damaged file gets the one-line error of :func:`~diffusion_transfer.io.checkpoint.safe_torch_load` instead
        of torch's traceback or hyper-parameters with flipped bits. The pickle is checked first (memory-mapped, so
        the tensors are not read; the checkpoint IO checks them when the weights are restored)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        local = bool(path) and Path(path).is_file()
        if local:
            safe_torch_load(path, what="a checkpoint", fix=RESUME_FIX, mmap=True)
        try:
            super()._parse_ckpt_path()
        except Exception:
            if not local:
                raise
            try:
                safe_torch_load(path, what="a checkpoint", fix=RESUME_FIX)  # the tensors too
            except CheckpointError as damaged:
                raise damaged from None  # torch's text, which advises weights_only=False, stays out
            raise  # the file is fine: another problem

    def before_instantiate_classes(self) -> None:
        # A config without trainer.precision gets the machine's fast path (bf16-mixed on native-bf16 hardware);
        # an explicit value, in the file or on the command line, is never replaced.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("precision") is not None:
            return
        precision, reason = default_precision(trainer.get("accelerator"))
        trainer["precision"] = precision
        if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's other ranks rerun this CLI: say it once
            print(f"precision: {precision} ({reason}; --trainer.precision overrides)")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Atomic local checkpoint writes (a temporary file in the same folder + os.replace), unless the config
        # chose its own checkpoint IO.
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def _prepare_subcommand_parser(self, trainer_class, subcommand, **kwargs):
        parser = super()._prepare_subcommand_parser(trainer_class, subcommand, **kwargs)
        if subcommand == "predict":
            # The ImageWriter saves every image; keeping them all in memory too would not scale to 50k.
            parser.set_defaults(return_predictions=False)
        return parser


    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective call (it broadcasts): every rank must make it
        if not trainer.is_global_zero:
            return
        lines = [f"run folder: {log_dir}  (TensorBoard: tensorboard --logdir {log_dir})"]
        grids = sorted(Path(log_dir or ".").glob("samples/step*.png"))
        if grids:
            lines.append(f"sample grid: {grids[-1]}")
        finals = [c.path for c in trainer.callbacks if isinstance(c, FinalCheckpoint) and c.path.exists()]
        callback = trainer.checkpoint_callback
        checkpoint = finals[0] if finals else callback and (callback.best_model_path or callback.last_model_path)
        if checkpoint:
            lines.append(f"checkpoint: {checkpoint}")
        for evaluation in (c for c in trainer.callbacks if isinstance(c, GenerativeEvaluation)):
            # A fit resumed past its last evaluation (or with nothing left to train) only has the restored one.
            stale = evaluation.last_step is not None and evaluation.last_step != trainer.global_step
            title = (f"metrics of the latest evaluation, at step {evaluation.last_step} (these weights are at step "
                     f"{trainer.global_step})" if stale else "metrics")
            summary = evaluation.summary(title)
            if summary:
                lines.append(summary)
        print("\n".join(lines))

    def after_predict(self) -> None:
        writers = [c for c in self.trainer.callbacks if isinstance(c, ImageWriter)]
        if writers and self.trainer.is_global_zero:
            writer = writers[0]
            count = len(list(writer.output_dir.glob("[0-9]*.png")))
            also = f" and {writer.zip_path}" if writer.zip_path else ""
            lines = [f"wrote {count} images to {writer.output_dir}{also}"]
            if writer.grid_path:
                lines.append(f"sample grid: {writer.grid_path}")
            # What these weights scored when their checkpoint was saved (restored from --ckpt_path).
            for evaluation in (c for c in self.trainer.callbacks if isinstance(c, GenerativeEvaluation)):
                summary = evaluation.summary(f"metrics of these weights at step {evaluation.last_step}")
                if summary:
                    lines.append(summary)
            print("\n".join(lines))


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> DiffusionCLI:
    """The CLI object; with ``run=False`` it only builds ``cli.model``, ``cli.datamodule``, ``cli.trainer``."""
    return DiffusionCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_class=DiffusionArgumentParser,
        args=list(args) if args is not None else None,
        run=run,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point of ``diffusion-transfer``."""
    try:
        build_cli(args)
    except Exception as err:  # noqa: BLE001 - re-raised below unless it is an expected input problem
        expected = _expected_error(err)
        if expected is None:
            raise
        # Expected problems with inputs: the message names the file or step and the fix; no traceback.
        print(f"diffusion-transfer: error: {expected}", file=sys.stderr)
        sys.exit(2)


def _model_options(tokens: Sequence[object]) -> set[str]:
    """Top-level model init-arg names set by ``--model.init_args.NAME[.sub]`` or ``--model.NAME`` tokens."""
    names = set()
    for token in tokens:
        if isinstance(token, str) and token.startswith("--model."):
            name = token[len("--model."):].split("=", 1)[0].removeprefix("init_args.").split(".", 1)[0]
            if name and name not in ("class_path", "init_args", "dict_kwargs", "help"):
                names.add(name)
    return names


def _unknown_option(parser: LightningArgumentParser, message: str, ex: Exception | None) -> str | None:
    """One line for a parse error about an unknown option or config key (with the closest known name), or None."""
    dash, known = "", []
    if match := re.match(r"unrecognized arguments: (.*)", message):
        options = [token.split("=", 1)[0] for token in match.group(1).split() if token.startswith("--")]
        if not options:
            return None
        key, dash = options[0][2:], "--"
        # The root parser reports what the subcommand's parser left over: look at the subcommand's options.
        subcommands = parser._subcommands_action._name_parser_map if parser._subcommands_action else {}
        chosen = [sub for name, sub in subcommands.items() if name in (getattr(parser, "args", None) or ())]
        for each in [parser, *(chosen or subcommands.values())]:
            known += _option_names(each)
    elif match := re.search(r"Subcommand '[^']+' does not accept option '([^']+)'", message):
        key, known = match.group(1), _option_names(getattr(ex, "subcommand_parser", None) or parser)
    elif match := re.search(r"Group '([^']+)' does not accept option '([^']+)'", message):
        key, known = f"{match.group(1)}.{match.group(2)}", _option_names(parser)
    elif match := re.search(r"Option '([^']+)' is not accepted(?! before)", message):
        # A class's init_args (model, data, optimizer...): jsonargparse names the parser keys and class paths.
        line_end = message.find("\n", match.end())
        before = message[:match.start()]
        prefix = "".join(f"{name}.init_args." for name in re.findall(r'Parser key "([^"]+)"', before))
        key = prefix + match.group(1)
        classes = re.findall(r"class_path[ =]'([^']+)'", message[:line_end if line_end >= 0 else None])
        if not prefix:  # a parser without subcommands (build_cli(..., run=False)) checking its own keys
            known = _option_names(parser)
        else:
            known = [prefix + name for name in _init_arg_names(classes[-1])] if classes else []
        dash = "--" if "NestedArg" in message else ""
    else:
        return None
    where = "" if dash else " in the config"
    suggestion = _closest(key, known)
    hint = f"did you mean {dash}{suggestion}?" if suggestion else "--help lists the options"
    return f"unknown option {dash}{key}{where}; {hint}"


def _option_names(parser: LightningArgumentParser) -> list[str]:
    return [option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _init_arg_names(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for ``class_path`` (empty if it cannot be resolved)."""
    from jsonargparse import ArgumentParser

    try:
        module, _, name = class_path.rpartition(".")
        scratch = ArgumentParser(exit_on_error=False)
        scratch.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
    except Exception:  # noqa: BLE001 - only a suggestion is lost
        return []
    return _option_names(scratch)


def _closest(key: str, known: Sequence[str]) -> str | None:
    """The known option closest to ``key``, preferring those of the same group (``trainer.``...)."""
    group = key.rpartition(".")[0]
    for pool in ([name for name in known if name.rpartition(".")[0] == group], known):
        matches = difflib.get_close_matches(key, list(dict.fromkeys(pool)), n=1, cutoff=0.6)
        if matches:
            return matches[0]
    return None


_EXPECTED = (ConfigError, DatasetError, CheckpointError, MetricError, FileNotFoundError, FloatingPointError)


def _expected_error(err: BaseException | None) -> BaseException | None:
    """The expected input error behind ``err`` (jsonargparse wraps errors raised while linking arguments)."""
    while err is not None:
        if isinstance(err, _EXPECTED):
            return err
        err = err.__cause__
    return None



if __name__ == "__main__":
    main()
