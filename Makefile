# The two commands the README starts with. Both create .venv if missing and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/unet.yaml
NAME := $(basename $(notdir $(CONFIG)))
OUT ?= reports/$(NAME)
# What `make train` compares, per config; `make train NORMS=a,b` or `SWEEP=key=v1,v2` overrides it.
SWEEP_unet := model.norm=batch,group,instance,none
SWEEP_unet_paper := model.norm=batch,group,instance,none
SWEEP_transformer_lm := model.norm=layer,rms,none
SWEEP_transformer_seq2seq := model.norm=layer,rms,batch,none
SWEEP_sketch_rnn := model.norm=none,layer,rms,batch
SWEEP_mambavision := model.token_norm=layer,rms,batch,none
SWEEP ?= $(if $(NORMS),model.norm=$(NORMS),$(SWEEP_$(NAME)))
# torch's CUDA wheels are large: give pip time on slow mirrors.
PIP := $(BIN)/python -m pip --default-timeout=180

.PHONY: train test setup clean

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
	$(BIN)/python train.py compare --config $(CONFIG) --sweep $(SWEEP) --out $(OUT)

test: $(VENV)/.dev
	WANDB_MODE=disabled $(BIN)/python -m pytest -q tests

clean:
	rm -rf runs reports wandb
