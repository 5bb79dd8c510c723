"""Decode sizes refused before anything compiles, in one line with their
figures (no program is built here: each refusal is a pure check)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.decoding import loops
from calm_jax.inference import limits
from calm_jax.model import llama
from calm_jax.model import network

import entry_points  # tests/entry_points.py

SMOLLM2 = llama.LlamaConfig()  # context 8,192
T5 = network.T5Config()  # T5 1.1 small's dims


def test_a_prompt_past_the_llama_context_is_refused():
  limits.check_lengths(SMOLLM2, limits.DecodeSize(1, 8000, 192))
  with pytest.raises(
    limits.SizeError, match=r'9000 tokens\) plus max_length \(64\) is 9064'
  ):
    limits.check_lengths(SMOLLM2, limits.DecodeSize(1, 9000, 64))
  with pytest.raises(limits.SizeError, match='context of 8192'):
    limits.check_lengths(SMOLLM2, limits.DecodeSize(1, 10, 10**9))


def test_t5_lengths_have_a_stated_limit():
  with pytest.raises(limits.SizeError, match='max_length 1000000 is above'):
    limits.check_lengths(T5, limits.DecodeSize(1, 64, 10**6))


def test_gamma_is_capped():
  limits.check_lengths(T5, limits.DecodeSize(1, 8, 64, gamma=16))
  with pytest.raises(limits.SizeError, match='gamma=1000 is above its cap'):
    limits.check_lengths(T5, limits.DecodeSize(1, 8, 64, gamma=1000))


def test_a_cache_larger_than_the_free_memory_is_refused_with_figures():
  size = limits.DecodeSize(64, 4096, 4096)
  parts = limits.memory_estimate(SMOLLM2, size)
  # 30 layers x 2 x 64 rows x 8192 positions x 3 heads x 64 x 4 bytes.
  assert parts['kv_cache'] == 30 * 2 * 64 * 8192 * 3 * 64 * 4
  need = sum(parts.values())
  limits.check_memory(SMOLLM2, size, free=need)
  with pytest.raises(limits.SizeError, match=r'needs at least .* GiB per dev'):
    limits.check_memory(SMOLLM2, size, free=need - 1)
  # Split over 4 devices, a quarter each.
  limits.check_memory(SMOLLM2, size, devices=4, free=need // 4 + 1)


def test_a_top_k_past_the_vocabulary_keeps_every_token():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 32))
  every = loops.filtered_logits(logits, loops.Sampling(1.0, 0, 1.0))
  clipped = loops.filtered_logits(logits, loops.Sampling(1.0, 10**9, 1.0))
  np.testing.assert_array_equal(every, clipped)
  top3 = loops.filtered_logits(logits, loops.Sampling(1.0, 3, 1.0))
  assert int(jnp.isfinite(top3).sum()) == 6


@pytest.mark.parametrize(
  'flags, message',
  [
    (
      ["--gin.MODE='exact'", '--gin.GAMMA=1000'],
      'error: gamma=1000 is above its cap, MAX_GAMMA=16',
    ),
    (
      ['--gin.calm_jax.DecodeInputs.target_length=1000000'],
      'error: max_length 1000000 is above T5_MAX_LENGTH=8192',
    ),
  ],
)
def test_the_decode_job_refuses_a_size_in_seconds(
  tiny_model_dir, tmp_path, flags, message
):
  """Through the job, before anything compiles: one line, exit 2, nothing
  written (3.1 and 3.7 s measured here, most of it imports; unbounded, the
  same settings compiled for minutes or grew to gigabytes)."""
  inputs = tmp_path / 'in.jsonl'
  inputs.write_text('{"inputs": "what is two"}\n')
  output = tmp_path / 'out'
  start = time.perf_counter()
  result = entry_points.run_subprocess(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{tiny_model_dir}'",
    f"--gin.INPUT_FILE='{inputs}'",
    '--gin.THRESHOLD=0.5',
    f"--gin.OUTPUT_DIR='{output}'",
    *flags,
  )
  seconds = time.perf_counter() - start
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message)
  assert seconds < 15 and not output.exists()
