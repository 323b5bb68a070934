# Two commands: `make demo` and `make test`. Both create .venv if missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# clean-fid (evaluate) needs torchvision, which must match torch exactly: install the pair together.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP   = $(VENV)/.installed

.PHONY: demo test install lint clean pipeline docs results-table

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sidflow demo

# Two workers with one thread each: most tests are small CPU processes, and one torch thread per process keeps a
# 2-core machine from being oversubscribed by every process's thread pool. worksteal: a worker left idle at the end
# takes queued tests from the other, so one worker's slow tail does not keep the run going alone.
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check sidflow tests benchmarks

# docs/parameters.md, from the stage configs (a test fails when it is stale).
docs: $(STAMP)
	$(PY) -m sidflow.paramdocs

# README's throughput table and docs/benchmarks.md's profile table, from the committed result files (a test fails when stale).
results-table: $(STAMP)
	$(PY) benchmarks/results_table.py --write

# The compiled IR (sidflow/kfp/sid_distill.yaml, pipeline/sid-distill.yaml) and components/<name>.yaml.
pipeline: $(STAMP)
	$(PY) -m sidflow.kfp.compile

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# Container images, tagged with sidflow.__version__ (see containers/README.md). Needs a docker engine.
IMAGE_REPO ?= ghcr.io/example/sidflow
VERSION    ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' sidflow/__init__.py)
.PHONY: images
# `make images IMAGE_REPO=registry.example.com/ml/sidflow PUSH=1` also pushes; then compile against that registry:
# sidflow pipeline compile --image-registry registry.example.com/ml --out sid-distill.yaml
PUSH ?= 0
images:
	docker build -f containers/runtime/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)-runtime:$(VERSION) .
	docker build -f containers/trainer/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)-trainer:$(VERSION) .
	if [ "$(PUSH)" = 1 ]; then docker push $(IMAGE_REPO)-runtime:$(VERSION) && docker push $(IMAGE_REPO)-trainer:$(VERSION); fi
