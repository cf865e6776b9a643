# Everything sets itself up: a virtual environment in .venv with the project and its dev tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-versions lint docs bench bench-instructions screenshot

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# Not --quiet: it drops the warnings before --strict can count them.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .venv/site

# The documentation site, served while you edit it.
docs: $(STAMP)
	$(BIN)/mkdocs serve

test: lint
	$(BIN)/python -m pytest --cov --cov-report=term

# The other supported Pythons, and the declared lower bounds: the suite without its integration tests.
test-versions: $(STAMP)
	.ci/versions

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Instructions and first-level data cache misses per task, under valgrind's cachegrind (apt install valgrind).
bench-instructions: $(STAMP)
	$(BIN)/python -m benchmarks.instructions

screenshot: $(STAMP)
	PYTHONPATH=. $(BIN)/python examples/screenshot.py docs/console.png
