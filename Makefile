# Quick start: `make run` (set-up + the default experiment), `make test` (set-up + every test);
# `make test-fast` after each change (no servers, no killed processes); `make docs` builds the site into site/
# (open site/index.html), `make docs-serve` serves it with live reload at http://127.0.0.1:8000.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-fast docs docs-serve install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "auror needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,postgres]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/auror run

# the fast tier in one worker per core (pytest-xdist); the slow tier (servers, killed workers, heartbeats) alone
test: test-fast
	$(VENV)/bin/pytest -m "slow and not manual"

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow and not manual" -n auto

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict  # the variable: the theme's end-of-life notice
	@echo "the site is in site/: open site/index.html"

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

clean:
	rm -rf $(VENV) reports/plots site
