# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - build the venv if needed, then run the main job on a synthetic demo line
#   make test   - build the venv if needed, then run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINE ?= bottle_caps
PROFILE ?= tiny

.PHONY: demo test venv constraints clean browser containers base-image image bento-lock bento-image test-containers

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $(STAMP)

# the venv's versions as the verified ones (constraints.txt), once a dependency change is installed and tested
constraints:
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip list --format=freeze --exclude-editable | \
	  grep -v -E '^(pip|setuptools|wheel|redi)=='; } > constraints.txt.new && mv constraints.txt.new constraints.txt

demo: $(STAMP)
	$(BIN)/redi demo --line $(LINE) --profile $(PROFILE)

# Headless Chromium renders pages in the browser tests (Evidently dashboard, review station, report); installed when missing and allowed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium could not be installed: the browser tests will be skipped"

test: $(STAMP) browser containers
	$(BIN)/python -m pytest tests

# Containers (README, "Containers"). podman, buildah, runc and debootstrap are installed and configured
# when missing and allowed (root + apt-get); otherwise the container tests skip and say why.
containers:
	@containers/setup_podman.sh || echo "podman is not usable here: the container tests will be skipped"

# the base image made from Debian's packages (no container registry is reachable here); kept once made
base-image: containers
	containers/make_base_image.sh

# the component image every pipeline step runs in (components/Dockerfile), on the local base that also
# carries the locked packages (containers/make_bento_base_image.sh, shared with the Bento's image);
# IMAGE=registry.example.com/factory/redi:0.1.0 REDI_BASE_IMAGE=python:3.11-slim where a registry is reachable
IMAGE ?= localhost/redi:0.1.0
image: $(STAMP) base-image
	containers/build_image.sh $(IMAGE)

# the Bento's packages locked to the venv's versions (serving/requirements.lock.txt)
bento-lock: $(STAMP)
	$(BIN)/python containers/lock_bento_requirements.py

# the production Bento (every line's production model; REDI_S3_* or REDI_STORE_DIR) as a container image
bento-image: $(STAMP) base-image
	$(BIN)/python containers/bento_image.py

# only the container tests (also part of `make test`): the Bento built and served, the Bento in its
# container, the component image and the demo line's steps in it (KFP's DockerRunner on podman) against
# the local runner; -m "not image" leaves out the component image's (the longest)
test-containers: $(STAMP) containers
	$(BIN)/python -m pytest tests/test_bento_build.py tests/test_containers.py

clean:
	rm -rf runs outputs data/demo
