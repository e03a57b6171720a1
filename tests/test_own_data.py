"""README "Your own data": its command blocks, read from the README, run in miniature from a fresh working folder.

Each ```bash block of the section is run command by command in a temporary working folder (with ``configs/`` linked
in), in this process: ``diffusion-transfer`` through :func:`diffusion_transfer.cli.main`, ``diffusion-transfer-data``
through :func:`diffusion_transfer.data.tool.main`, and ``make TARGET`` by running the Makefile's recipe of the target
(and of its missing prerequisites) the same way. So the README, the Makefile and this test cannot drift apart: a
command the test cannot run fails it. Only the sizes shrink: each command gets the options of :func:`miniature`
appended (2 training steps, 2 sampling steps, 36 images for the metrics, 12 predicted images, float32). The data are
made at the README's size, which takes a fraction of a second, and the models keep their configs' architectures, so
the source checkpoints fit the transfers as they do at full size.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from diffusion_transfer.cli import main as cli_main
from diffusion_transfer.data.tool import main as tool_main

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Your own data"
OWN_DATA = "runs/own/data-16.zip"
FEATURES = "runs/own/features/final.ckpt"
METHODS = {"Diffusion", "DiffTuning", "DMP", "FineDiffusion", "CBDM", "T2H", "EDMDiffusion", "DiffInstruct"}
METRIC_IMAGES = 36  # more than the 32 feature dimensions, which FID needs; 3 per class


def readme_blocks() -> list[tuple[str, list[list[str]]]]:
    """``(heading, commands)`` of each bash block of the README section, in order; heading ``""`` before the first
    ``###``. A command is its argv: continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    blocks: list[tuple[str, list[list[str]]]] = []
    heading, code = "", None
    for line in text[start:end if end >= 0 else None].splitlines():
        if code is None and line.startswith("### "):
            heading = line[4:].strip()
        elif code is None and line.strip() == "```bash":
            code = []
        elif code is not None and line.strip() == "```":
            joined = "\n".join(code).replace("\\\n", " ")
            blocks.append((heading, [argv for argv in (shlex.split(cmd, comments=True) for cmd in joined.splitlines())
                                     if argv]))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


BLOCKS = readme_blocks()
SETUP = [commands for heading, commands in BLOCKS if not heading]
METHOD_BLOCKS = [(heading, commands) for heading, commands in BLOCKS if heading]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def config_of(argv: list[str]) -> dict:
    return yaml.safe_load(Path(option(argv, "--config")).read_text())


def model_name(config: dict) -> str:
    return config["model"]["class_path"].rsplit(".", 1)[-1]


def miniature(argv: list[str]) -> list[str]:
    """Options appended to a README command to run it in seconds (same architectures, same data)."""
    if Path(argv[0]).name != "diffusion-transfer":
        return []
    config = config_of(argv)
    model = model_name(config)
    # float32: on a CPU with native bf16 the CLI picks bf16-mixed, which made these 2-step runs 10x slower (177 s
    # instead of 17 s for this file, measured on 2 cores); tests/test_precision.py covers bf16.
    quick = ["--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"]
    if argv[1] == "predict":
        return ["--data.init_args.predict_seeds", "0-11", "--data.init_args.batch_size", "12",
                "--model.init_args.sample_steps", "2", "--metrics.num_images", str(METRIC_IMAGES), *quick]
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "1" if model == "DiffInstruct" else "2",
             "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "8",
             "--data.init_args.val_max_images", "8", *quick]
    if model == "FeatureClassifier":
        return steps
    metrics = ["--metrics.num_images", str(METRIC_IMAGES), "--metrics.batch_size", str(METRIC_IMAGES),
               "--metrics.every_n_validations", "1"]
    if (config.get("metrics") or {}).get("sampling"):
        metrics += ["--metrics.sampling", "{steps: 2}"]
    return [*steps, "--model.init_args.val_num_images", "2", "--model.init_args.sample_steps", "2", *metrics]


class Makefile:
    """Just enough of make for the README's targets: variables, explicit and ``%`` rules, order-only prerequisites,
    ``$@`` and ``$*``. A target is built when its file is missing (after its prerequisites); targets inside the
    virtual environment are taken as built (the tests run in it)."""

    def __init__(self, path: Path) -> None:
        self.vars: dict[str, str] = {}
        self.rules: list[tuple[str, list[str], list[str]]] = []
        recipe: list[str] | None = None
        for line in path.read_text().splitlines():
            if line.startswith("\t") and recipe is not None:
                recipe.append(line.strip())
                continue
            recipe = None
            if match := re.match(r"^(\w+)\s*[:?]?=\s*(.*)$", line):
                self.vars[match.group(1)] = match.group(2).strip()
            elif match := re.match(r"^([^\s#.][^:=]*):\s*([^=]*)$", line):  # not .PHONY
                recipe = []
                for target in self.expand(match.group(1)).split():
                    # Order-only prerequisites (after "|") are built when missing, like the others.
                    self.rules.append((target, self.expand(match.group(2)).replace("|", " ").split(), recipe))

    def expand(self, text: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: self.expand(self.vars.get(m.group(1), "")), text)

    def rule(self, target: str) -> tuple[list[str], list[str], str]:
        for pattern, prerequisites, recipe in self.rules:
            if pattern == target:
                return prerequisites, recipe, ""
        for pattern, prerequisites, recipe in self.rules:
            if "%" in pattern:
                head, tail = pattern.split("%", 1)
                if target.startswith(head) and target.endswith(tail) and len(target) > len(head) + len(tail):
                    stem = target[len(head):len(target) - len(tail)]
                    return [p.replace("%", stem) for p in prerequisites], recipe, stem
        raise AssertionError(f"make {target}: no rule in the Makefile")

    def build(self, target: str, run) -> None:
        venv = self.expand("$(VENV)")
        if target == venv or target.startswith(f"{venv}/") or Path(target).exists():
            return
        prerequisites, recipe, stem = self.rule(target)
        for prerequisite in prerequisites:
            self.build(prerequisite, run)
        for line in recipe:
            run(shlex.split(self.expand(line).replace("$@", target).replace("$*", stem)))


MAKEFILE = Makefile(REPO / "Makefile")


def run_command(argv: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> str:
    """Run one README (or recipe) command in this process; return its standard output (with ``capsys``)."""
    tool = Path(argv[0]).name
    if argv[0] in (".", "source"):  # activating the venv: the tests already run in it
        return ""
    if tool == "make":
        outputs = []
        for target in argv[1:]:
            MAKEFILE.build(target, lambda recipe: outputs.append(run_command(recipe, capsys)))
        return "\n".join(outputs)
    args = [*argv[1:], *miniature(argv)]
    if tool == "diffusion-transfer-data":
        assert tool_main(args) == 0, f"{shlex.join(argv)} failed (its error is in the captured stderr)"
    else:
        assert tool == "diffusion-transfer", f"the test cannot run this README command: {shlex.join(argv)}"
        cli_main(args)
    if capsys is None:
        return ""
    out, err = capsys.readouterr()
    print(out, err)  # kept in the report of a failing test
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh working folder (with the repository's configs) in which the section's first block has run."""
    folder = tmp_path_factory.mktemp("own")
    (folder / "configs").symlink_to(REPO / "configs")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        for commands in SETUP:
            for argv in commands:
                run_command(argv)
    finally:
        os.chdir(previous)
    return folder


def test_the_section_covers_every_method_from_a_folder() -> None:
    assert SETUP, f"README {SECTION}: the first block (the folder, the zip, the feature network) is missing"
    setup = [argv for commands in SETUP for argv in commands]
    tools = [(Path(a[0]).name, a[1] if len(a) > 1 else "") for a in setup]
    assert ("diffusion-transfer-data", "export") in tools and ("diffusion-transfer-data", "convert") in tools
    assert option(next(a for a in setup if a[1:2] == ["convert"]), "--resolution") == "16"
    fits = [argv for _, commands in METHOD_BLOCKS for argv in commands if argv[:2] == ["diffusion-transfer", "fit"]]
    assert {model_name(config_of(argv)) for argv in fits} == METHODS
    for argv in fits:
        assert option(argv, "--data.init_args.path") == OWN_DATA, shlex.join(argv)
        assert option(argv, "--metrics.feature_network") == FEATURES, shlex.join(argv)
        assert option(argv, "--trainer.default_root_dir").startswith("runs/own/"), shlex.join(argv)
    for heading, commands in METHOD_BLOCKS:
        assert commands[0][0] == "make", f"{heading}: the sequence starts by making its source model"
        assert [a[1] for a in commands if a[0] == "diffusion-transfer"].count("predict") >= 1, heading


@pytest.mark.parametrize("heading, commands", METHOD_BLOCKS,
                         ids=[re.sub(r"\W+", "-", h).strip("-") for h, _ in METHOD_BLOCKS])
def test_readme_sequence_runs_in_miniature(heading: str, commands: list[list[str]], workdir: Path,
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    outputs = [(argv, run_command(argv, capsys)) for argv in commands]
    data = json.loads(zipfile.ZipFile(OWN_DATA).read("dataset.json"))
    assert len(data["class_names"]) == 12  # the new label space (the source models have 20 classes)
    for argv, out in outputs:
        if argv[:2] == ["diffusion-transfer", "fit"]:
            assert f"metrics ({METRIC_IMAGES} images): fid" in out, out
        if argv[:2] != ["diffusion-transfer", "predict"]:
            continue
        root = Path(option(argv, "--trainer.default_root_dir"))
        assert (root / "final.ckpt").is_file()
        assert f"sample grid: {root / 'samples-grid.png'}" in out and (root / "samples-grid.png").is_file(), out
        assert f"metrics of these weights at step 2 ({METRIC_IMAGES} images): fid" in out, out
        samples = json.loads(zipfile.ZipFile(root / "samples.zip").read("dataset.json"))
        assert samples["class_names"] == data["class_names"]
        assert sorted(label for _, label in samples["labels"]) == list(range(12))
        assert len(list((root / "samples").glob("*.png"))) == 12
        reports = sorted(root.glob("lightning_logs/version_*/metrics-val-step*.json"))
        assert reports, f"{root}: no metrics JSON"
        metrics = json.loads(reports[-1].read_text())["metrics"]
        expected = {"fid", "accuracy"}
        if (config_of(argv).get("metrics") or {}).get("precision_recall", True):
            expected |= {"precision", "recall"}
        assert expected <= metrics.keys(), sorted(metrics)
