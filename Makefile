# Set-up is two commands: `make demo` and `make test`. Each creates .venv and
# installs the package (editable, with the test and hf extras: the HF
# equality tests run by default) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-slow demo bench validity vocab clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP)
	$(PY) -m calm_jax.demo --gin_file=gin/experiments/demo.gin

bench: $(STAMP)
	$(PY) -m calm_jax.bench --output runs/bench/bench.json

validity: $(STAMP)
	test -f runs/demo/model/model.json || $(MAKE) demo
	$(PY) -m calm_jax.validity --output_dir runs/validity

vocab: $(STAMP)
	$(PY) -m tasks.build_vocab

clean:
	rm -rf runs/demo
