# The two commands the README starts with. Both create .venv if missing and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/unet.yaml
NORMS ?= batch,group,instance,none
NAME := $(basename $(notdir $(CONFIG)))
OUT ?= reports/$(NAME)
# torch's CUDA wheels are large: give pip time on slow mirrors.
PIP := $(BIN)/python -m pip --default-timeout=180

.PHONY: train test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

train: setup
	$(BIN)/python train.py fit --config $(CONFIG) --trainer.default_root_dir runs/$(NAME)
	$(BIN)/python train.py compare --config $(CONFIG) --norms $(NORMS) --out $(OUT)

test: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q tests

clean:
	rm -rf runs reports wandb
