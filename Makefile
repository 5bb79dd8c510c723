# Set-up is two commands: `make demo` and `make test`. Each creates .venv and
# installs the package (editable, with test extras) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-slow demo vocab clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP)
	$(PY) -m calm_jax.demo --gin_file=gin/experiments/demo.gin

vocab: $(STAMP)
	$(PY) -m tasks.build_vocab

clean:
	rm -rf runs/demo
