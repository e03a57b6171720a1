# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision are installed first, pinned, so pip never swaps in another (multi-GB) build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
DEMO_DIR := runs/demo

.PHONY: demo test lint install install-dev notebooks benchmarks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,vae,fid]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The venv is an order-only prerequisite (after |): the data needs the tool installed, but reinstalling the package
# (a newer setup.cfg) must not regenerate the data and so retrain every stage built on it.
$(DEMO_DIR)/shapes-%-16.zip: | $(VENV)/.installed
	$(VENV)/bin/diffusion-transfer-data shapes $@ --resolution 16 --per-class 200 --seed 0 --domain $*

# Every run writes into its own run directory (the config's trainer.default_root_dir), its finished weights as
# <run dir>/final.ckpt. Stage 1 runs once; delete the checkpoint to pre-train again. The file appears only when the
# fit completes (FinalCheckpoint), so an interrupted stage is redone, not taken as finished.
$(DEMO_DIR)/pretrain-unet/final.ckpt: $(DEMO_DIR)/shapes-filled-16.zip
	$(VENV)/bin/diffusion-transfer fit --config configs/diffusion/shapes16_pretrain_unet.yaml

# The DiT source model of the DiT-based methods' benchmarks and of their "Your own data" sequences.
# The long-tail configs fine-tune the demo's U-Net, as the papers use the DDPM U-Net.
$(DEMO_DIR)/pretrain-dit/final.ckpt: $(DEMO_DIR)/shapes-filled-16.zip
	$(VENV)/bin/diffusion-transfer fit --config configs/diffusion/shapes16_pretrain.yaml

# That DiT fine-tuned to "outline" until its FID stops improving (22,400 steps, about 40 minutes on 2 cores): the
# converged model that the DMP config patches, and the base of FineDiffusion's 32 outline classes.
$(DEMO_DIR)/dit-outline/final.ckpt: $(DEMO_DIR)/pretrain-dit/final.ckpt $(DEMO_DIR)/features/final.ckpt
	$(VENV)/bin/diffusion-transfer fit --config configs/diffusion/shapes16_dit_outline.yaml

# Diffusion Tuning's replay bank: 2,000 samples of the demo's U-Net source (configs/difftuning/bank.yaml).
$(DEMO_DIR)/difftuning-bank/bank.zip: $(DEMO_DIR)/pretrain-unet/final.ckpt
	$(VENV)/bin/diffusion-transfer predict --config configs/difftuning/bank.yaml

# The EDM teacher of configs/diff_instruct/shapes.yaml, and the EDM source model of README "Your own data".
runs/edm/shapes/final.ckpt: $(DEMO_DIR)/shapes-filled-16.zip
	$(VENV)/bin/diffusion-transfer fit --config configs/edm/shapes.yaml

# The feature network of the metrics (FID etc. on shapes), trained on the target domain.
$(DEMO_DIR)/features/final.ckpt: $(DEMO_DIR)/shapes-outline-16.zip
	$(VENV)/bin/diffusion-transfer fit --config configs/features/shapes.yaml

demo: $(DEMO_DIR)/pretrain-unet/final.ckpt $(DEMO_DIR)/features/final.ckpt
	$(VENV)/bin/diffusion-transfer fit --config configs/quickstart.yaml
	$(VENV)/bin/diffusion-transfer predict --config configs/quickstart.yaml --ckpt_path $(DEMO_DIR)/quickstart/final.ckpt

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --nbmake tests notebooks

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
