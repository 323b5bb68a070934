# Two commands: `make demo` and `make test`. Both create .venv if missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# clean-fid (evaluate) needs torchvision, which must match torch exactly: install the pair together.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP   = $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sidflow demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check sidflow tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# Container images, tagged with sidflow.__version__ (see containers/README.md). Needs a docker engine.
IMAGE_REPO ?= ghcr.io/example/sidflow
VERSION    ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' sidflow/__init__.py)
.PHONY: images
images:
	docker build -f containers/runtime/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)-runtime:$(VERSION) .
	docker build -f containers/trainer/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)-trainer:$(VERSION) .
