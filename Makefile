# `make test` and `make demo` build .venv from nothing with pinned versions (constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

.PHONY: test test-fast demo clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The playground's browser tests drive Debian's headless chromium through its chromedriver.
# Installed here when missing and apt-get can (CI runs as root, without a terminal); if that
# fails the browser tests skip and say why: never a reason for `make test` to fail.
browser:
	@if { [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; } \
	    && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver for the browser tests"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      chromium chromium-driver; } </dev/null \
	    || echo "could not install chromium: the browser tests will skip"; \
	fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/lorafleet demo

clean:
	rm -rf $(VENV) build src/*.egg-info
