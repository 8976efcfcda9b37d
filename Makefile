# The two commands a fresh clone needs: `make run` (main job) and `make test` (test suite).
# Both create the virtual environment first if it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
ENV    ?= InvertedPendulum-v5
STEPS  ?= 5000
SEED   ?= 0
OUT    ?= runs/$(ENV)-seed$(SEED)

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE   ?= ghcr.io/mbpo-project/mbpo

.PHONY: setup run train test bench lint clean image image-cuda lock

$(VENV)/.installed: pyproject.toml docker/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first: any other spec pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# The image's lock as constraints: the tests run against exactly what the image installs,
	# not whatever the registry released since (`make lock` re-pins after an upgrade).
	$(PY) -m pip install --quiet -e '.[dev]' -c docker/requirements.txt
	touch $@

setup: $(VENV)/.installed

# The pipeline under kfp.local; replay shards and run records in a local object store.
run: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/mbpo run --env $(ENV) --total-steps $(STEPS) --seed $(SEED) \
		--out $(OUT) --store runs/store

# The same training in one process.
train: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/mbpo train --env $(ENV) --total-steps $(STEPS) --seed $(SEED) --out $(OUT)-train

test: setup
	./scripts/test-deps.sh
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: setup
	OMP_NUM_THREADS=2 $(PY) benchmarks/speed.py
	OMP_NUM_THREADS=2 $(PY) benchmarks/learning.py --env InvertedPendulum-v5 --seeds 0 1 2 --total-steps 5000
	OMP_NUM_THREADS=2 $(PY) benchmarks/pipeline.py overhead --env InvertedPendulum-v5 --total-steps 1500 --cold
	OMP_NUM_THREADS=2 $(PY) benchmarks/pipeline.py bytes --env Hopper-v5

lint: setup
	$(VENV)/bin/ruff check mbpo_core components pipelines tests benchmarks scripts

# The component image (docker/Dockerfile), by scripts/build-image.sh: the official slim Python
# base, or one made offline (scripts/make-base-image.sh) where it cannot be pulled; torch from
# this machine's pip configuration (TORCH_INDEX=URL adds an index).
image:
	PIP="$(PYTHON) -m pip" ./scripts/build-image.sh $(IMAGE):$(VERSION)

# The CUDA build of torch, which the build's own pip fetches (TORCH_INDEX=URL adds an index).
image-cuda:
	HOST_WHEEL=0 PIP="$(PYTHON) -m pip" ./scripts/build-image.sh $(IMAGE):$(VERSION)-cuda torch==2.13.0

# Re-pin docker/requirements.txt to this environment's runtime dependencies (after, say,
# `.venv/bin/pip install -U PACKAGE`; `make setup` installs the pins, so they move only here).
lock: setup
	$(PY) scripts/lock-requirements.py

clean:
	rm -rf $(VENV) runs .pytest_cache
