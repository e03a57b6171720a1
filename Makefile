# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision are installed first, pinned, so pip never swaps in another (multi-GB) build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test lint install install-dev notebooks benchmarks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/diffusion-transfer-data shapes $(DEMO_DIR)/shapes-filled-16.zip --resolution 16 --per-class 100 --seed 0 --domain filled
	$(VENV)/bin/diffusion-transfer-data shapes $(DEMO_DIR)/shapes-outline-16.zip --resolution 16 --per-class 100 --seed 1 --domain outline
	$(VENV)/bin/diffusion-transfer-data longtail $(DEMO_DIR)/shapes-outline-16.zip $(DEMO_DIR)/shapes-outline-16-lt.zip --imbalance 0.1
	$(VENV)/bin/diffusion-transfer-data info $(DEMO_DIR)/shapes-outline-16-lt.zip

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --nbmake tests notebooks

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
