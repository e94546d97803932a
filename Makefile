# alphanet-train: `make setup` (idempotent), `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Outside CI the default suite skips tests marked slow; CI=true runs everything.
PYTEST_ARGS ?= $(if $(filter true 1,$(CI)),,-m "not slow")

.PHONY: setup demo test lint docs clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml data_pipeline/_jpeg_region.c scripts/install_system_packages.sh
	scripts/install_system_packages.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	scripts/quietly.sh "pip install requirements" $(PY) -m pip install --disable-pip-version-check -r requirements.txt
	scripts/quietly.sh "pip install project" $(PY) -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The demo: model table, bundled data, a 2-process DeepSpeed run of the tiny recipe on CPU, then the
# search of the trained supernet (Pareto front table + PNG, exported models).
# Rerunning it resumes the finished run and only re-validates it; `make clean` starts over.
DEMO_ENV := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1

demo: setup
	$(PY) -m models.flops configs/alphanet_models.yaml
	$(PY) -m data_pipeline.prepare --source digits --out data/digits --formats webdataset ffcv --quiet
	$(DEMO_ENV) $(VENV)/bin/deepspeed --num_gpus 2 trainer/run.py --config configs/tiny_cpu.yaml
	$(DEMO_ENV) $(PY) search/run.py --config configs/search_tiny_cpu.yaml --run runs/tiny_cpu --export tiny_m pareto@0.5

test: setup
	scripts/install_system_packages.sh --test
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff: lint rules and the formatter (120 columns), both configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# docs/config.md, the reference of every config key, from the config dataclasses.
docs: setup
	$(PY) scripts/config_reference.py

clean:
	rm -rf runs data .pytest_cache
