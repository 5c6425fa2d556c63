# The two commands the README starts with. Both create .venv if missing and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/unet.yaml
NAME := $(basename $(notdir $(CONFIG)))
OUT ?= reports/$(NAME)
# What `make train` compares: the config's own `compare.sweep`, unless NORMS=a,b or SWEEP=key=v1,v2.
# torch's CUDA wheels are large: give pip time on slow mirrors.
PIP := $(BIN)/python -m pip --default-timeout=180

.PHONY: train test setup kernels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# Test-only extras, plus the official MambaVision package without its CUDA-only dependencies
# (mamba_ssm, causal_conv1d): the tests compare our port with it.
$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps mambavision==1.2.0
	touch $@

# The main job: the config trained once per norm (each a full run with its own checkpoints), then
# the comparison report.
train: setup
	$(BIN)/python train.py compare --config $(CONFIG) $(if $(NORMS),--norms $(NORMS)) $(if $(SWEEP),--sweep $(SWEEP)) \
		--out $(OUT)

# zoo's C++ CPU kernels built now rather than on first use (zoo/cpu_kernels.py), into torch's extension
# directory (TORCH_EXTENSIONS_DIR), for machines that should not compile at run time.
kernels: setup
	$(BIN)/python -c 'import sys, zoo.cpu_kernels as k; sys.exit(k.build_ahead())'

# Two pytest-xdist workers (TEST_WORKERS=0: one process), handed one test at a time; tests/conftest.py
# orders the slow tests first.
TEST_WORKERS ?= 2
test: $(VENV)/.dev
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxschedchunk 1 tests

clean:
	rm -rf runs reports wandb
