# sharpbench: set-up, tests and common runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install test test-slow train smoke table1 table1-full table1-smoke report clean

install:  ## create .venv and install sharpbench (editable) with its dev extras
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"

test:  ## the default test suite (CPU, minutes)
	$(BIN)/python -m pytest -q

test-slow:  ## the slow tests (real data, longer training)
	$(BIN)/python -m pytest -q -m slow

train:  ## one training run: make train ARGS="optimizer=sam dataset=cifar10"
	$(BIN)/python -m sharpbench.train $(ARGS)

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

clean:
	rm -rf outputs .pytest_cache
