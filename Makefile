# Set-up and checks. `make demo` and `make test` work from a fresh clone with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of this torch is what CI and the developers' machines install; pyproject.toml
# itself accepts torch>=2.4.
TORCH_VERSION := 2.13.0

.PHONY: install demo test lint format bench clean

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

DEMO_OUT := out/demo

demo: install
	mkdir -p $(DEMO_OUT)
	$(BIN)/refq convert examples/models/example.pt --qconfig examples/models/example.yaml \
		--output $(DEMO_OUT)/example.refq.safetensors --force
	cat $(DEMO_OUT)/example.refq.report.md
	$(BIN)/refq inspect $(DEMO_OUT)/example.refq.safetensors

test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/reference_forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
