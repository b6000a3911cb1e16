# Quickstart on a fresh machine:  make demo   |   make test
# Everything installs into .venv from nothing, at the versions in requirements/lock.txt (a pip
# constraints file made by `make lock`). torch goes in first (the tested CPU build, 2.13.0) so
# pip never pulls a multi-GB CUDA build as a dependency; where the base Python already has
# torch (a GPU cluster's CUDA build) the venv sees it and keeps it.
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
# e.g. make TORCH_INDEX=https://download.pytorch.org/whl/cpu  (where no CPU wheel is at hand)
TORCH_INDEX   ?=
PY            := $(VENV)/bin/python
STAMP         := $(VENV)/.ponder-pt-installed
PYTEST_ARGS   ?=
# pytest-xdist workers (one per core; TEST_WORKERS=0 runs in one process). Whole files go to a
# worker (their module fixtures are built once), the slowest files first (tests/durations.json)
TEST_WORKERS  ?= $(shell nproc 2>/dev/null || echo 2)
XDIST         := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
LOCK          ?= requirements/lock.txt
LOCK_OLDEST   ?= requirements/lock-transformers-oldest.txt
UV_VERSION    ?= 0.13.9
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-compat test-latest lock wheelhouse install-offline \
        bench study study-toy clean slurm-up slurm-down slurm-status test-slurm gpu-bundle

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch of $(PYTHON): venv with system site packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -c $(LOCK) -e ".[dev,eval]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ponder-pt demo --out demo_out

# the suite's budget: a fresh-clone .ci/run within 25 minutes on a quiet 2-core machine;
# tools/suite_time.py names the tests that grew against tests/durations.json (a report only)
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25 $(PYTEST_ARGS)
	-@$(PY) tools/suite_time.py

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The export / generation / early-exit-backbone tests again, with transformers at the oldest
# version pyproject.toml declares (the main lock has the newest): the pins that differ between
# the two locks go into .venv-compat, which is put in front of the venv's site-packages.
COMPAT_DIR    ?= .venv-compat
COMPAT_TESTS  ?= hf_compat and not slow
test-compat: $(STAMP) $(LOCK_OLDEST)
	$(PY) tools/overlay.py --base $(LOCK) --lock $(LOCK_OLDEST) --target $(COMPAT_DIR)
	PYTHONPATH=$(CURDIR)/$(COMPAT_DIR) PONDER_EXPECT_TRANSFORMERS=$$($(PY) tools/overlay.py \
	  --lock $(LOCK_OLDEST) --version-of transformers) \
	  PONDER_DURATIONS_FILE=$(CURDIR)/.pytest-durations-compat.json \
	  $(PY) -m pytest -q $(XDIST) -m "$(COMPAT_TESTS)" $(PYTEST_ARGS)

# Drift check, not CI: a fresh venv with the newest release of every dependency that
# pyproject.toml allows (no lock), then the whole suite. Run it before users meet a release.
LATEST_VENV   ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -e ".[dev,eval,wandb]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	PONDER_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# Regenerate both lock files from pyproject.toml's ranges with uv (newest allowed releases).
lock: $(STAMP)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(PY) tools/lock.py --uv $(VENV)/bin/uv --upgrade

# Offline installs for air-gapped nodes: every wheel of ponder-pt and its extras, at the locked
# versions, for PYTHON_VERSION and PLATFORM (not necessarily this machine's); torch only with
# WITH_TORCH=1. Then on the node: make install-offline WHEELHOUSE=wheelhouse
PYTHON_VERSION ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PLATFORM       ?= manylinux_2_28_x86_64
WITH_TORCH     ?= 0
WHEELHOUSE     ?= wheelhouse
WHEELHOUSE_ONLY ?=
wheelhouse: $(STAMP)
	$(PY) tools/wheelhouse.py --lock $(LOCK) --python-version $(PYTHON_VERSION) \
	  --platform $(PLATFORM) --with-torch $(WITH_TORCH) --out $(WHEELHOUSE) \
	  $(if $(WHEELHOUSE_ONLY),--only $(WHEELHOUSE_ONLY))

# Installs into $(PYTHON)'s environment (a cluster's venv with its own CUDA torch) from the
# wheelhouse alone; no network is touched.
install-offline:
	@test -d "$(WHEELHOUSE)" || { echo "no wheelhouse at '$(WHEELHOUSE)': run make wheelhouse first"; exit 2; }
	@$(PYTHON) -c "import torch" 2>/dev/null || ls $(WHEELHOUSE)/torch-*.whl >/dev/null 2>&1 || \
	  { echo "$(PYTHON) has no torch and $(WHEELHOUSE) holds none: install the site's torch first, or build with WITH_TORCH=1"; exit 2; }
	$(PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) "ponder-pt[eval,wandb]"
	$(PYTHON) -m ponder_pt --version

# A lent GPU machine (Python 3.12, its own CUDA torch and transformers, no index): .gpu/ holds
# a snapshot of HEAD and py3.12 wheels of what such a machine lacks. Carry .gpu and run
# `bash .gpu/repo/tools/gpu_run.sh [gpu_suite args]` there (see benchmarks/README.md).
GPU_WHEELS ?= deepspeed,megatron-core,pydantic,pydantic-core,annotated-types,typing-inspection,hjson,datasets,dill,multiprocess,typing-extensions,pytest,pluggy,iniconfig,pygments,pytest-timeout
gpu-bundle: $(STAMP)
	rm -rf .gpu && mkdir -p .gpu/repo
	git archive HEAD | tar -x -C .gpu/repo
	$(PY) tools/wheelhouse.py --lock $(LOCK) --python-version 3.12 --platform $(PLATFORM) \
	  --only $(GPU_WHEELS) --out .gpu/whl
	@du -sh .gpu

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

# A private SLURM on this machine (root; installs slurm-wlm + munge with apt-get if missing)
# for trying the sbatch scripts on CPUs: see README.md, SLURM and Multi-node. Then
#   export SLURM_CONF=$(SLURM_DIR)/slurm.conf
# NODES=2 (or more) simulates that many nodes in network namespaces (tools/netns_cluster.py).
SLURM_DIR ?= /tmp/ponder-slurm
NODES ?= 1
slurm-up:
	python3 tools/slurm_local.py up --dir $(SLURM_DIR) --nodes $(NODES)

slurm-down:
	python3 tools/slurm_local.py down --dir $(SLURM_DIR)

slurm-status:
	python3 tools/slurm_local.py status --dir $(SLURM_DIR)

# only the live-SLURM tests, one node and two simulated ones (each module starts and stops its
# own SLURM; part of `make test` too). PONDER_SLURM=require turns a SLURM that cannot start
# into a failure instead of a skip, as in CI.
test-slurm: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests/test_slurm_live.py tests/test_slurm_multinode.py \
	  $(PYTEST_ARGS)

clean:
	rm -rf demo_out study_toy_out .pytest_cache $(COMPAT_DIR) $(LATEST_VENV)
