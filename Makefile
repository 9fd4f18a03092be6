# Quick start: `make run` (set-up + the default experiment), `make test` (set-up + tests).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "auror needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,postgres]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/auror run

test: $(STAMP)
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) reports/plots
