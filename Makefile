# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench bench-full bench-cdc docs package-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or reference fails.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The sdist and the wheel built, the wheel installed with its extras in a fresh virtualenv and
# smoke-tested, and a subset of the tests run against the lowest versions pyproject admits.
package-check: $(STAMP)
	.ci/package-check

demo: $(STAMP)
	$(BIN)/cachesync demo

lint: $(STAMP)
	$(BIN)/ruff check cachesync tests examples benchmarks
	$(BIN)/ruff format --check cachesync tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks --full

# The change feeds beside the outbox relay (PostgreSQL, MariaDB and Redis on this machine).
bench-cdc: $(STAMP)
	$(BIN)/python -m benchmarks.cdc

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache site dist
