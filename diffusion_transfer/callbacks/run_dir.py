"""``in_run_dir``: where a callback's output path lands. Every output of a run lives in its run directory.

The run directory is ``trainer.default_root_dir`` (the working directory when it is unset), so
``--trainer.default_root_dir runs/mine`` moves everything a run writes. The rule for an output path such as
``FinalCheckpoint.path``, ``ImageWriter.output_dir`` / ``zip_path`` or ``GenerativeEvaluation.output``:

- an absolute path (``~`` expanded) is used as given;
- a relative path names a place inside the run directory: ``samples`` -> ``<run dir>/samples``;
- a relative path that already starts with the run directory (``runs/demo/quickstart/samples`` for the run
  directory ``runs/demo/quickstart``) is read from the working directory, so it is not doubled;
- a relative path that starts like the run directory but leaves it (``runs/demo/checkpoints/x.ckpt`` for
  ``runs/demo/quickstart``: how configs named outputs before run directories) is refused with a
  :class:`~diffusion_transfer.errors.ConfigError`, as it would silently become
  ``runs/demo/quickstart/runs/demo/checkpoints/x.ckpt``. Write a path inside the run directory, move the run
  directory, or give an absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def in_run_dir(path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None, option: str) -> Path:
    """``path`` resolved by the rule above against ``run_dir`` (``trainer.default_root_dir``; ``None``: the working
    directory). ``option`` names the setting in the error message."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    root = Path(os.path.normpath(Path(run_dir if run_dir is not None else os.getcwd()).expanduser()))
    here = Path.cwd()
    if root.is_absolute() and root.is_relative_to(here):
        root = root.relative_to(here)  # "." when the run directory is the working directory
    prefix = root.parts if root != Path(".") else ()
    parts = Path(os.path.normpath(given)).parts
    if prefix and parts[:len(prefix)] == prefix:
        return given  # already a path into the run directory, from the working directory
    if prefix and len(parts) > 1 and parts[0] == prefix[0]:
        raise ConfigError(
            f"{option} {given}: a relative output path is taken inside the run directory trainer.default_root_dir "
            f"({root}), which would make it {root / given}. Give a path inside the run directory (e.g. {given.name}), "
            "change --trainer.default_root_dir, or give an absolute path")
    return root / given
