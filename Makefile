# Quickstart on a fresh machine:  make demo   |   make test
# Everything installs into .venv from nothing. torch goes in first (the tested CPU build,
# 2.13.0) so pip never pulls a multi-GB CUDA build as a dependency; where the base Python
# already has torch (a GPU cluster's CUDA build) the venv sees it and keeps it.
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
# e.g. make TORCH_INDEX=https://download.pytorch.org/whl/cpu  (where no CPU wheel is at hand)
TORCH_INDEX   ?=
PY            := $(VENV)/bin/python
STAMP         := $(VENV)/.ponder-pt-installed
PYTEST_ARGS   ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench study study-toy clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch of $(PYTHON): venv with system site packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -e ".[dev,eval]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ponder-pt demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py

# the miniature study of the papers' claims (experiments/README.md): ~30 min on 2 CPU cores;
# rerunning skips finished runs and only regenerates the tables and figures
STUDY_OUT  ?= experiments/results
STUDY_ARGS ?=
study: $(STAMP)
	$(PY) -m experiments.study --out $(STUDY_OUT) $(STUDY_ARGS)

study-toy: $(STAMP)
	$(PY) -m experiments.study --toy --out study_toy_out $(STUDY_ARGS)

clean:
	rm -rf demo_out study_toy_out .pytest_cache
