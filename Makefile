# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - build the venv if needed, then run the main job on a synthetic demo line
#   make test   - build the venv if needed, then run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINE ?= bottle_caps
PROFILE ?= tiny

.PHONY: demo test venv clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/redi demo --line $(LINE) --profile $(PROFILE)

# Headless Chromium renders pages in the browser tests (Evidently dashboard, review station, report); installed when missing and allowed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium could not be installed: the browser tests will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs outputs data/demo
