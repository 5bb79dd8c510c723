"""bench.py: one case end to end on a tiny random model (fields and sense)."""

import jax
import numpy as np
import pytest

from calm_jax import errors
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.jobs import bench
from calm_jax.model import models
from calm_jax.model import network


def _tiny_bench():
  cfg = network.T5Config(
    vocab_size=64,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_encoder_layers=1,
    num_decoder_layers=4,
  )
  model = models.CalmModel(cfg)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  inputs = np.random.RandomState(0).randint(3, 64, (4, 6)).astype(np.int32)
  loaded = loaded_lib.in_memory(
    model, params, classifier=bench.random_classifier(cfg)
  )
  return bench.BenchModel(
    'tiny',
    decoder_lib.Decoder(loaded),
    inputs,
    5,
    (0.5, 0.25, 0.125, 0.125),
    'test',
  )


def test_forced_patterns():
  tiny = _tiny_bench()
  np.testing.assert_array_equal(
    bench.forced_pattern('exit@2', tiny, 2), np.full((2, 5), 2)
  )
  mixed = bench.forced_pattern('mixed', tiny, 4)
  assert mixed.shape == (4, 5) and set(mixed.ravel()) <= {1, 2, 3, 4}
  assert bench.forced_pattern('disabled', tiny, 1) is None


def _static(tiny, batch):
  return bench.loop_runner(
    tiny, modes.FullDepth(), bench.encoded_context(tiny, batch), batch
  )


def _case(tiny, batch, measure, pattern):
  """One bench case after compiling the static decoder, as bench_model."""
  return bench.run_case(
    tiny, batch, measure, pattern, _static(tiny, batch), repeats=1
  )


def test_run_case_reports_every_field():
  tiny = _tiny_bench()
  case = _case(tiny, 4, 'softmax', 'exit@2')
  assert case['avg_layers'] == 2.0
  assert case['layer_ideal_speedup'] == 2.0
  assert 1.0 < case['flops_ideal_speedup'] < 2.0
  assert case['buckets'] == [1, 2, 4]
  for key in (
    'model',
    'batch_size',
    'pattern',
    'confidence',
    'measured_speedup',
    'efficiency',
    'compile_s_static',
    'compile_s_early',
  ):
    assert key in case
  ratio = case['measured_speedup'] / case['flops_ideal_speedup']
  assert abs(case['efficiency'] - ratio) <= 0.01 * ratio
  assert 0.05 < case['measured_speedup'] < 20
  disabled = _case(tiny, 1, 'state', 'disabled')
  assert disabled['avg_layers'] == 4.0
  assert disabled['flops_ideal_speedup'] < 1.0  # the checks cost something


def test_bf16_case_and_dtype_flag(tmp_path):
  tiny = bench.with_dtype(_tiny_bench(), 'bfloat16')
  assert tiny.config.dtype == 'bfloat16'
  case = _case(tiny, 2, 'softmax', 'exit@1')
  assert case['dtype'] == 'bfloat16' and case['avg_layers'] == 1.0
  assert '| bfloat16 | 2 | softmax | exit@1 |' in bench.markdown_table([case])
  with pytest.raises(errors.SettingError, match="unknown dtype 'float16'"):
    bench.bench(dtypes=['float16'], output=str(tmp_path / 'b.json'))
  assert not (tmp_path / 'b.json').exists()


def test_token_agreement_counts_positions_up_to_the_longer_output():
  out = lambda *tokens: type('G', (), {'tokens': list(tokens)})
  reference = [out(5, 6, 1), out(7, 1), out(3, 1)]
  other = [out(5, 6, 1), out(7, 8, 1), out(4, 1)]
  assert bench.token_agreement(reference, other) == {
    'token_agreement': round(5 / 8, 4),
    'identical_outputs': round(1 / 3, 4),
    'tokens': 8,
    'examples': 3,
  }
