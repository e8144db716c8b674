# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - build the venv if needed, then run the main job on a synthetic demo line
#   make test   - build the venv if needed, then run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINE ?= bottle_caps
PROFILE ?= tiny

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/redi demo --line $(LINE) --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs outputs data/demo
