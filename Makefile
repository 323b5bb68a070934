# Two commands: `make demo` and `make test`. Both create .venv if missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU wheel is enough for the demo and the tests; on a GPU box pick the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
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
