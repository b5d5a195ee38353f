# concur: `make demo` runs the whole story, `make test` runs every check.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
SRC := concur adapters policies sim tests bench

.PHONY: demo test lint typecheck pytest test-vllm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[sim]'
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,sim]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/concur demo

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

# vLLM in the loop (docs/vllm.md): vLLM 0.32.0 on the CPU build of torch, without
# vLLM's GPU-only requirements, in a venv of its own; runs the tests marked `vllm`.
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip --quiet
VLLM_REQS := 'transformers>=5.16.1,<5.20' 'fastapi>=0.133,<0.137' 'llguidance>=1.7,<1.8' \
	xgrammar==0.2.8 'oss-harmony>=0.0.11' 'openai>=2.25' 'aiohttp>=3.14.3' 'requests>=2.33' \
	'pillow>=12.3' 'pydantic>=2.12' 'prometheus_client>=0.18' 'pyzmq>=25' numpy regex cachetools \
	'apache-tvm-ffi==0.1.11' psutil cbor2 msgspec cloudpickle uvloop py-cpuinfo pybase64 \
	partial-json-parser einops

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip
	$(VLLM_PIP) install torch==2.13.0
	$(VLLM_PIP) install --no-deps vllm==0.32.0
	$(VLLM_PIP) install $(VLLM_REQS)
	$(VLLM_PIP) install -e '.[dev,sim]'
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -q -m vllm tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info
