# kdnb: two commands do everything on a fresh machine.
#   make demo   runs the main job (papermill) into runs/demo/ and prints a results table
#   make test   export/clean checks, nbdev_test over the notebooks, then pytest
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEVICE ?= auto
DEMO_ARGS ?=

.PHONY: setup demo test export clean-nbs bench help

help:
	@echo "make demo [DEVICE=cuda]  - run the main experiment into runs/demo/"
	@echo "make test                - the full test suite (what CI runs)"
	@echo "make bench [DEVICE=cuda] - benchmarks (cache, MGDA, harness overhead, peer) printing measured ratios"
	@echo "make bench-data          - streamed data and cache at scale (loader vs decode limit, memory, K teachers)"
	@echo "make docs / docs-serve   - build the docs site into docs/_build/html / serve it on http://127.0.0.1:8000/"
	@echo "make lab                - JupyterLab in the project venv (live explorers)"
	@echo "make export / clean-nbs  - nbdev_export / nbdev_clean"

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) -m kdnb.runs demo --device $(DEVICE) $(DEMO_ARGS)

test: setup
	@bash tools/test.sh

export: setup
	$(PY) -m tools.nbdev_run export

clean-nbs: setup
	$(PY) -m tools.nbdev_run clean

.PHONY: bench-mgda
bench-mgda: setup  ## step time of MGDA-UB / exact MGDA / DTO-KD against a weighted sum
	$(PY) bench/mgda_bench.py --device $(DEVICE)

.PHONY: bench-cache
bench-cache: setup  ## epoch time of 3-teacher KD: online teachers vs teacher-output cache vs student alone
	$(PY) bench/cache_bench.py --device $(DEVICE)

.PHONY: bench-peer
bench-peer: setup  ## epoch time of single-teacher KD: kdnb vs torchdistill (same models, data, batch, optimizer, threads)
	$(PY) bench/peer_bench.py --device $(DEVICE)

.PHONY: bench-harness
bench-harness: setup  ## kdnb's Distiller vs a minimal hand-written loop, same KD recipe, models, data and batch
	$(PY) bench/harness_bench.py --device $(DEVICE)

# every benchmark, each printing its ratios measured side by side in one run
bench: bench-cache bench-mgda bench-harness bench-peer bench-data

.PHONY: bench-data
bench-data: setup  ## streamed loader vs decode limit, memory vs dataset size, cached K-teacher epochs, cache build vs forward
	$(PY) bench/data_bench.py --device $(DEVICE)

.PHONY: docs docs-serve lab
docs: setup  ## the docs site (every notebook executed at test sizes, cached) into docs/_build/html
	$(PY) docs/build.py

docs-serve: docs  ## serve the built site on http://127.0.0.1:8000/
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory docs/_build/html

lab: setup  ## JupyterLab in the project venv (the live explorers: nbs/tutorials/explorers.ipynb)
	$(PY) -m jupyterlab nbs
