# Two commands on a fresh clone: `make run` (the main job) and `make test`.
# Both create .venv and install the package first if needed (~1 min, once).
VENV   ?= .venv
PYTHON ?= python3
EXTRA  ?= cpu
CONFIG ?= configs/mini.yaml
PY     := $(VENV)/bin/python

.PHONY: install run test clean-runs

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip install -q -e ".[$(EXTRA),base-lm,dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m benchmarks.run --config $(CONFIG) --system bm25 --split dev

test: $(VENV)/.installed
	$(PY) -m pytest

clean-runs:
	rm -rf runs
