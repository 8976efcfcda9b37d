# The two commands a fresh clone needs: `make run` (main job) and `make test` (test suite).
# Both create the virtual environment first if it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
ENV    ?= InvertedPendulum-v5
STEPS  ?= 5000
SEED   ?= 0
OUT    ?= runs/$(ENV)-seed$(SEED)

.PHONY: setup run test bench lint clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first: any other spec pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/mbpo train --env $(ENV) --total-steps $(STEPS) --seed $(SEED) --out $(OUT)

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: setup
	OMP_NUM_THREADS=2 $(PY) benchmarks/speed.py
	OMP_NUM_THREADS=2 $(PY) benchmarks/learning.py --env InvertedPendulum-v5 --seeds 0 1 2 --total-steps 5000

lint: setup
	$(VENV)/bin/ruff check mbpo_core tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
