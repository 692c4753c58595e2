# The two commands:
#   make demo   set everything up, then train on the built-in dataset and sample (the main job)
#   make test   set everything up, then run every test (lint included)
#   make site   build the course's website into build/site
# Set-up makes a virtual environment in .venv and installs the package into it, editable.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser sandbox docs site demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The widget test drives the system's Chromium (never a downloaded one). Installed here when we may
# (root with apt-get, as on CI); elsewhere the test skips and says why.
# Tried once per environment (the stamp), so an offline machine does not retry on every run.
browser: $(VENV)/.browser-tried

$(VENV)/.browser-tried: | setup
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no Chromium here: the browser widget test will be skipped"
	@touch $@

# The grader isolates each submission with bubblewrap (Debian's package) where it is installed; the
# isolation tests need it. Installed here when we may (root with apt-get, as on CI), tried once.
sandbox: $(VENV)/.bwrap-tried

$(VENV)/.bwrap-tried: | setup
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } \
		|| echo "no bubblewrap here: the grader runs without isolation and its isolation tests are skipped"
	@touch $@

# The website: Sphinx, MyST-NB and the book theme (the docs extra), MathJax from npm's mathjax package.
docs: $(VENV)/.docs-installed

$(VENV)/.docs-installed: pyproject.toml | setup
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $@

site: docs
	$(BIN)/python tools/build_site.py

demo: setup
	$(BIN)/coursekit demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint browser sandbox docs
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs build .pytest_cache .ruff_cache
