# sharpbench: set-up, tests and common runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
CONSTRAINTS ?= requirements/constraints.txt
# PyTorch's CPU-only wheels (Linux/Windows; PyPI's Linux torch pulls the CUDA libraries, ~6 GB)
CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-cpu test test-quick test-slow train eval smoke table1 table1-full table1-smoke report bench clean

install:  ## create .venv; install sharpbench (editable, dev extras) at the verified versions
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c $(CONSTRAINTS) -e ".[dev]"

# install-cpu takes only torch and torchvision from the CPU index, in a first pip call with
# --no-deps: --index-url replaces PyPI for the whole call, so resolving torch's dependencies
# there failed with an unrelated-looking "ResolutionImpossible" on filelock when the index was
# unreachable. The second call, from PyPI only, finds torch 2.x.y+cpu installed; it satisfies
# the constraint torch==2.x.y (a pin without a local label matches +cpu, PEP 440), so pip keeps
# the CPU wheels and installs their dependencies (filelock, sympy, ...) and the rest from PyPI.
# (--extra-index-url instead would silently fall back to PyPI's CUDA torch when the CPU index
# cannot be reached.) An unreachable CPU index now stops the first call with a message naming it.
install-cpu:  ## the same without the CUDA libraries: torch/torchvision from PyTorch's CPU index
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c $(CONSTRAINTS) --index-url $(CPU_INDEX) --no-deps torch torchvision || \
	  { echo "install-cpu: could not get torch/torchvision from $(CPU_INDEX) (unreachable?);" \
	    "set CPU_INDEX=<a mirror>, or use 'make install' (PyPI's torch, with the CUDA libraries)" >&2; exit 1; }
	$(BIN)/pip install -c $(CONSTRAINTS) -e ".[dev]"

test:  ## the default test suite (CPU, minutes)
	$(BIN)/python -m pytest -q

test-quick:  ## the default suite without the end-to-end tests (day-to-day work)
	$(BIN)/python -m pytest -q -m 'not slow and not e2e'

test-slow:  ## the slow tests (real data, longer training)
	$(BIN)/python -m pytest -q -m slow

train:  ## one training run: make train ARGS="optimizer=sam dataset=cifar10"
	$(BIN)/sharpbench train $(ARGS)

eval:  ## evaluate a trained run: make eval RUN=outputs/runs/<run>
	$(BIN)/sharpbench eval "$(RUN)" $(ARGS)

smoke:  ## a complete tiny run on synthetic data, CPU, well under a minute
	$(BIN)/python -m sharpbench.train experiment=smoke optimizer=sam $(ARGS)

TABLE1_SMOKE = model=tiny_cnn dataset=synthetic trainer=smoke schedule=constant trainer.max_epochs=1 \
	dataset.train_subset=512 dataset.test_subset=256 trainer.enable_progress_bar=false sweep_name=table1_smoke

table1:  ## Table 1: 4 methods x CIFAR-10/100 x 4 seeds, 80 epochs; ARGS="hydra/launcher=local_parallel ..."
	$(BIN)/python -m sharpbench.train -m experiment=table1 $(ARGS)

table1-full:  ## Table 1 with every method of the project (SGD, ASAM, ImbSAM, A2SAM, HATAM, X-SAM, GSAM too)
	$(BIN)/python -m sharpbench.train -m experiment=table1_full $(ARGS)

table1-smoke:  ## the same sweep shrunk for CPU (tiny CNN, synthetic data, 1 epoch): about a minute
	$(BIN)/python -m sharpbench.train -m experiment=table1 $(TABLE1_SMOKE) $(ARGS)

report:  ## rebuild a sweep's report: make report [DIR=outputs/sweeps/table1] (default: the latest sweep) [ARGS="--first-epochs 10 20"]
	$(BIN)/python -m sharpbench.report $(DIR) $(ARGS)

bench:  ## speed benchmark, every method, ResNet-18 (about 30 min on a 2-core CPU): make bench ARGS="model=tiny_cnn"
	$(BIN)/sharpbench bench $(ARGS)

clean:
	rm -rf outputs .pytest_cache
