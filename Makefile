# One entry point for a fresh machine: `make demo`, `make test`. Everything installs into .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
MIN_SITE ?= .venv-min
PY := $(VENV)/bin/python

.PHONY: install demo test test-min lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The oldest supported Transformers, layered over .venv (torch is shared, not installed twice).
$(MIN_SITE)/.installed: $(VENV)/.installed requirements-min.txt
	rm -rf $(MIN_SITE)
	$(PY) -m pip install --quiet --target $(MIN_SITE) -r requirements-min.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest

test-min: $(MIN_SITE)/.installed
	PYTHONPATH=$(CURDIR)/$(MIN_SITE) $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/run.py --suite baseline --out benchmarks/results/baseline-cpu.json

clean:
	rm -rf $(VENV) $(MIN_SITE) .pytest_cache .ruff_cache
