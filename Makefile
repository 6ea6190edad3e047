# One entry point for a fresh machine: `make demo`, `make test`. Everything installs into .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
MIN_SITE ?= .venv-min
PY := $(VENV)/bin/python

.PHONY: install lock demo test test-min test-compat test-peer test-peer-min test-vllm test-swift space chromium test-browser lint bench clean

# requirements-lock.txt holds the versions the suite last passed with (torch excepted: the machine's own build), so a
# fresh clone installs what was tested; `make lock` writes it again after a requirements change.
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements-dev.txt -c requirements-lock.txt
	touch $@

# The oldest supported Transformers, layered over .venv (torch is shared, not installed twice).
$(MIN_SITE)/.installed: $(VENV)/.installed requirements-min.txt
	rm -rf $(MIN_SITE)
	$(PY) -m pip install --quiet --target $(MIN_SITE) -r requirements-min.txt
	touch $@

install: $(VENV)/.installed

lock: install
	echo "# Versions the test suite passed with; written by \`make lock\`. torch, torchvision and their CUDA wheels are left to the machine." > requirements-lock.txt
	$(PY) -m pip freeze --exclude-editable | grep -viE '^((torch|torchvision|triton)==|nvidia-|cuda-)' >> requirements-lock.txt

demo: install
	$(PY) examples/demo.py

# The web demo (space/app.py) on the digits demo at http://127.0.0.1:7860; `python space/build.py OUT` makes a Space.
space: install
	$(PY) space/app.py

# The web demo in a real browser: Debian's chromium (apt-get installs it when missing; Playwright downloads nothing).
chromium:
	test -x /usr/bin/chromium || ($$(command -v sudo) apt-get update -qq && $$(command -v sudo) apt-get install -y -qq chromium)

test-browser: install chromium
	INTERNVL_X_BROWSER_TEST=1 $(PY) -m pytest -q tests/test_space_browser.py

# The whole suite; the oldest supported Transformers is installed too (.venv-min), because the DeepSpeed tests load
# the checkpoints they write with it.
test: install $(MIN_SITE)/.installed
	$(PY) -m pytest

test-min: $(MIN_SITE)/.installed
	PYTHONPATH=$(CURDIR)/$(MIN_SITE) $(PY) -m pytest

# The compat-marked subset on the newest patch of every Transformers minor (and a newer pre-release), resolved from the
# package index when it runs; each version is layered over .venv in .venv-compat/VERSION.
test-compat: install
	$(PY) devtools/compat_matrix.py

# Transformers' own common tests (ModelTesterMixin, ConfigTester, ImageProcessingTestMixin, ProcessorTesterMixin),
# taken from the sdist of the installed Transformers (peer_tests/fetch_mixins.py), on the newest and the oldest.
test-peer: install
	$(PY) -m pytest -q peer_tests

test-peer-min: $(MIN_SITE)/.installed
	PYTHONPATH=$(CURDIR)/$(MIN_SITE) $(PY) -m pytest -q peer_tests

# vLLM's CPU build in its own virtualenv with our plugin (devtools/vllm_env.py says what it needs here), then the vLLM
# tests in it: the bundle through vLLM's Transformers backend (test_vllm.py) and LVTC through the plugin
# (test_vllm_lvtc.py).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: requirements-vllm.txt devtools/vllm_cpu_fixes.py devtools/vllm_env.py vllm_plugin/pyproject.toml
	$(PYTHON) devtools/vllm_env.py --venv $(VLLM_VENV)

# The scenarios run vLLM's engine core inside the scenario's process (VLLM_ENABLE_V1_MULTIPROCESSING=0: on these 2 cores
# the tests take 5.1 minutes so, 9.2 with the core in a process of its own); `vllm serve` keeps its own, as users get it.
test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_lvtc.py

# ms-swift (`swift sft`), which needs Transformers below 5.20 and TRL below 1.0: the packages it needs beyond .venv,
# pinned in requirements-swift.txt, in a folder layered over .venv (torch shared), then tests/test_swift.py with it.
SWIFT_SITE ?= .venv-swift
$(SWIFT_SITE)/.installed: $(VENV)/.installed requirements-swift.txt
	rm -rf $(SWIFT_SITE)
	$(PY) -m pip install --quiet --no-deps --target $(SWIFT_SITE) -r requirements-swift.txt
	touch $@

test-swift: $(SWIFT_SITE)/.installed
	PYTHONPATH=$(CURDIR)/$(SWIFT_SITE) $(PY) -m pytest -q tests/test_swift.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/run.py --suite baseline --out benchmarks/results/baseline-cpu.json

clean:
	rm -rf $(VENV) $(MIN_SITE) $(VLLM_VENV) $(SWIFT_SITE) .venv-compat .peer .pytest_cache .ruff_cache
