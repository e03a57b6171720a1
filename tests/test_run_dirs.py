"""Run directories: the output-path rule, and configs, Makefile and docs that agree on where each file lives.

Every output of a run lives under its ``trainer.default_root_dir`` (``diffusion_transfer/callbacks/run_dir.py``). The
CLI side (fit and predict writing only into the run directory) is in ``tests/test_cli.py``; these checks read files.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from diffusion_transfer.callbacks.run_dir import in_run_dir
from diffusion_transfer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CHECKPOINT = re.compile(r"(?:runs|\$\(DEMO_DIR\))/[\w./=-]+\.ckpt")


def test_relative_outputs_land_in_the_run_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert in_run_dir("final.ckpt", "runs/a", "path") == Path("runs/a/final.ckpt")
    assert in_run_dir("sub/x.png", "runs/a", "path") == Path("runs/a/sub/x.png")
    assert in_run_dir("runs/a/samples", "runs/a", "path") == Path("runs/a/samples")  # not doubled
    assert in_run_dir("runs/a/samples", str(tmp_path / "runs/a"), "path") == Path("runs/a/samples")
    assert in_run_dir(tmp_path / "elsewhere.ckpt", "runs/a", "path") == tmp_path / "elsewhere.ckpt"
    assert in_run_dir("x.ckpt", None, "path") == Path("x.ckpt")  # no run directory: the working directory
    assert in_run_dir("runs/b/x.ckpt", "/somewhere/else", "path") == Path("/somewhere/else/runs/b/x.ckpt")
    # From the working directory into another run's folder: refused, naming the option and the doubled path.
    with pytest.raises(ConfigError, match=r"FinalCheckpoint path runs/demo/checkpoints/x\.ckpt: .*"
                                          r"runs/demo/quickstart/runs/demo/checkpoints/x\.ckpt.*\(e\.g\. x\.ckpt\)"):
        in_run_dir("runs/demo/checkpoints/x.ckpt", "runs/demo/quickstart", "FinalCheckpoint path")


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _outputs(config: dict) -> set[str]:
    """The files a config names in its run directory: the final checkpoint and the predict zip."""
    root = PurePosixPath(config["trainer"]["default_root_dir"])
    files = {str(root / (c.get("init_args") or {}).get("path", "final.ckpt"))
             for c in config["trainer"].get("callbacks") or [] if c["class_path"].endswith(".FinalCheckpoint")}
    zip_path = (config.get("writer") or {}).get("zip_path")
    return files | ({str(root / zip_path)} if zip_path else set())


ALL_OUTPUTS = set().union(*(_outputs(_config(c)) for c in CONFIGS))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_a_config_writes_only_into_its_own_run_directory(path: Path) -> None:
    config = _config(path)
    trainer = config["trainer"]
    assert trainer.get("default_root_dir", "").startswith("runs/"), "every config names its run directory"
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") or {}
        assert "dirpath" not in init_args, "ModelCheckpoint files belong in the run directory (no dirpath)"
        if callback["class_path"].endswith(".FinalCheckpoint"):
            assert "path" not in init_args or not init_args["path"].startswith(("runs/", "/"))
    for group, key in (("writer", "output_dir"), ("writer", "zip_path"), ("metrics", "output")):
        value = (config.get(group) or {}).get(key)
        assert value is None or not value.startswith(("runs/", "/")), f"{group}.{key}: a name in the run directory"
    # Every trained file a config reads from runs/ is written by a config (a run directory's final.ckpt, a bank).
    model = config["model"].get("init_args") or {}
    reads = [model.get("checkpoint"), model.get("replay_bank"), (config.get("metrics") or {}).get("feature_network")]
    for value in reads:
        if value and value.startswith("runs/") and value.endswith((".ckpt", ".zip")):  # not a user's EDM .pkl
            assert value in ALL_OUTPUTS, f"{value} is written by no config"


def test_run_directories_are_distinct_and_not_nested() -> None:
    roots = [PurePosixPath(_config(c)["trainer"]["default_root_dir"]) for c in CONFIGS]
    assert len(set(roots)) == len(roots)
    assert not [(a, b) for a in roots for b in roots if a != b and b.is_relative_to(a)]


def test_make_targets_are_the_files_their_configs_write() -> None:
    makefile = (REPO / "Makefile").read_text().replace("$(DEMO_DIR)", "runs/demo")
    found = re.findall(r"^(runs/\S+\.ckpt): (.*)\n\t.* fit --config (\S+)", makefile, flags=re.M)
    assert len(found) == 5  # the two sources, the EDM teacher, the feature network, the outline DiT
    rules = [(target, config) for target, _, config in found]
    for target, prerequisites, config in found:
        assert {path for path in _outputs(_config(REPO / config)) if path.endswith(".ckpt")} == {target}
        # A rule depends on every trained file its config reads, so make builds them first.
        settings = _config(REPO / config)
        reads = [(settings["model"].get("init_args") or {}).get("checkpoint"),
                 (settings.get("metrics") or {}).get("feature_network")]
        for value in reads:
            if value and value.startswith("runs/"):
                assert value in prerequisites.split(), f"make {target}: {value} is not a prerequisite"
    # The replay bank's rule predicts with the config that writes it, from the U-Net that the U-Net rule makes (the
    # bank config reads it as its model.init_args.checkpoint, and the rule depends on that file).
    bank = re.search(r"^(runs/\S+\.zip): (\S+)\n\t.* predict --config (\S+)$", makefile, flags=re.M)
    assert bank and _outputs(_config(REPO / bank.group(3))) == {bank.group(1)}
    source = _config(REPO / bank.group(3))["model"]["init_args"]["checkpoint"]
    assert bank.group(2) == source and (source, "configs/diffusion/shapes16_pretrain_unet.yaml") in rules
    # `make demo` needs the files the quickstart reads, and predicts from the file it writes.
    quickstart = _config(REPO / "configs/quickstart.yaml")
    needs = re.search(r"^demo: (.*)$", makefile, flags=re.M).group(1).split()
    assert set(needs) == {quickstart["model"]["init_args"]["checkpoint"], quickstart["metrics"]["feature_network"]}
    assert f"--ckpt_path {quickstart['trainer']['default_root_dir']}/final.ckpt" in makefile


def test_documented_checkpoint_paths_are_written_by_a_config() -> None:
    # README commands, config headers, benchmark defaults, notebooks and the Command lines of docs/results.md.
    texts = {p: p.read_text() for p in [REPO / "README.md", REPO / "Makefile", *CONFIGS,
                                        *(REPO / "benchmarks").glob("*.py"), *(REPO / "notebooks").glob("*.ipynb")]}
    texts[REPO / "docs/results.md"] = "\n".join(line for line in (REPO / "docs/results.md").read_text().splitlines()
                                                if line.startswith("Command:"))
    for path, text in texts.items():
        for found in CHECKPOINT.findall(text):
            found = found.replace("$(DEMO_DIR)", "runs/demo")
            if "lightning_logs/" in found or "<" in found:
                continue
            moved = f"--trainer.default_root_dir {PurePosixPath(found).parent}" in text  # a run moved on purpose
            assert found in ALL_OUTPUTS or moved, f"{path.relative_to(REPO)}: {found} is written by no config"
