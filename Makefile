# ditforge: `make demo` (train the tiny DiT on built-in digits, sample, measure), `make demo-onestep`
# (distil the demo's model into a MeanFlow model that samples in one evaluation, sample, measure)
# and `make test`.
# The demo trains with the recipe that won on the digits (README "Measured": flow matching with
# logit-normal times and the modern blocks reach DiT's 800-step FID in 400 steps); `ditforge
# train` with no arguments keeps the paper's DiT recipe (RUN=runs/digits, DEMO_TRAIN="" for it).
# Each target creates .venv on first use; PYTHON and TORCH_SPEC may be overridden, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
DEMO_CFG ?= 4.0
DEMO_TRAIN ?= --objective flow --time-dist logit-normal --norm rms --mlp swiglu --rope --qk-norm --steps 400
# The one-step demo: half the flow run's steps of guided distillation (README "Measured", MeanFlow),
# its guidance built in at the demo's scale, so one evaluation draws a guided sample; it needs the
# flow demo (a diffusion run, DEMO_TRAIN="", cannot be distilled into MeanFlow: train says so)
ONESTEP_RUN ?= $(RUN)-onestep
ONESTEP_TRAIN ?= --objective meanflow --init-from $(RUN) --mf-velocity teacher --train-cfg $(DEMO_CFG) --steps 200

.PHONY: install install-test demo demo-onestep test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/ditforge train --run-dir $(RUN) $(DEMO_TRAIN)
	$(BIN)/ditforge sample $(RUN) --cfg $(DEMO_CFG) --out $(RUN)/demo_grid.png
	$(BIN)/ditforge eval $(RUN) --cfg $(DEMO_CFG) --json $(RUN)/demo_eval.json
	@echo "pictures: $(RUN)/demo_grid.png (one row per class); training previews: $(RUN)/samples/"

demo-onestep: install
	@test -f $(RUN)/demo_eval.json || $(MAKE) demo
	$(BIN)/ditforge train --run-dir $(ONESTEP_RUN) $(ONESTEP_TRAIN)
	$(BIN)/ditforge sample $(ONESTEP_RUN) --steps 1 --out $(ONESTEP_RUN)/demo_grid.png
	$(BIN)/ditforge eval $(ONESTEP_RUN) --steps 1 --json $(ONESTEP_RUN)/demo_eval.json
	@echo "pictures in one model evaluation: $(ONESTEP_RUN)/demo_grid.png; the flow model's 20: $(RUN)/demo_grid.png"

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
