"""The evaluation engine: modes, provenance-keyed cache, scores, timing."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from calm_jax.data import pipeline
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes


@pytest.fixture(scope='module')
def lm(tiny_model_dir):
  """The loaded tiny model (one load for the module)."""
  return loaded_lib.load(str(tiny_model_dir))


@pytest.fixture(scope='module')
def decoder(lm):
  return decoder_lib.Decoder(lm)


@pytest.fixture(scope='module')
def examples():
  return pipeline.task_examples('synth_qa', 'validation', num_examples=5)


def test_full_depth_is_the_static_decoder_and_early_exit_at_1_5_too(
  lm, decoder, examples
):
  evaluator = engine.Evaluator(decoder, batch_size=2, progress=False)
  full = evaluator.decode(examples, modes.FullDepth())
  assert len(full.outputs) == 5 and full.seconds > 0
  assert all(set(row) == {4} for row in full.exit_layers)
  static = np.asarray(
    lm.model.predict_full_depth(
      lm.params,
      np.stack(
        [
          np.pad(
            e.input_ids, (0, examples.lengths['inputs'] - len(e.input_ids))
          )
          for e in examples.examples
        ]
      ),
      examples.lengths['targets'],
    )
  )
  for output, row in zip(full.outputs, static):
    ids = list(row)
    expected = ids[: ids.index(1) + 1] if 1 in ids else ids
    assert output['token_ids'] == [int(i) for i in expected]
  disabled = evaluator.decode(
    examples, modes.EarlyExit(lm.exit_config('softmax'), 1.5)
  )
  assert disabled.predictions == full.predictions
  assert all(c is None for o in disabled.outputs for c in o['confidences'])
  oracle = evaluator.decode(examples, modes.FullDepth(oracle=True))
  assert oracle.predictions == full.predictions
  assert oracle.avg_layers <= full.avg_layers


def test_forced_exits_follow_the_given_layers(lm, decoder, examples):
  evaluator = engine.Evaluator(decoder, batch_size=4, progress=False)
  config = lm.exit_config('softmax')
  at_two = evaluator.decode(examples, modes.ForcedExits(config, layer=2))
  assert all(set(row) == {2} for row in at_two.exit_layers)
  rows = tuple((1, 3, 2, 1) for _ in range(len(examples)))
  mixed = evaluator.decode(
    examples, modes.ForcedExits(config, exit_layers=rows)
  )
  for row, forced in zip(mixed.exit_layers, rows):
    padded = list(forced) + [1] * len(row)  # past a row's end: layer 1
    assert row == padded[: len(row)]
  mode = modes.ForcedExits(config, exit_layers=((2,), (3, 3)))
  np.testing.assert_array_equal(
    mode.forced_layers([1, 0], (3, 4)),
    [[3, 3, 1, 1], [2, 1, 1, 1], [1, 1, 1, 1]],
  )


def test_the_cache_answers_only_an_identical_fingerprint(
  lm, decoder, examples, tmp_path, capsys
):
  evaluator = engine.Evaluator(
    decoder, batch_size=4, cache_dir=str(tmp_path), progress=False
  )
  mode = modes.EarlyExit(lm.exit_config('state'), 0.5)
  first = evaluator.decode(examples, mode)
  [entry] = tmp_path.glob('*.json')
  stored = json.loads(entry.read_text())
  assert stored['fingerprint'] == evaluator.fingerprint(examples, mode)
  stored['outputs'][0]['prediction'] = 'from the cache'
  entry.write_text(json.dumps(stored))
  again = evaluator.decode(examples, mode)
  assert again.predictions[0] == 'from the cache'  # a hit
  other = evaluator.decode(
    examples, modes.EarlyExit(lm.exit_config('state', min_exit=3), 0.5)
  )
  assert len(list(tmp_path.glob('*.json'))) == 2  # another setting: a miss
  assert other.avg_layers >= 3
  fewer = pipeline.task_examples('synth_qa', 'validation', num_examples=4)
  evaluator.decode(fewer, mode)
  assert len(list(tmp_path.glob('*.json'))) == 3
  entry.write_text(entry.read_text()[:50])  # truncated on disk
  recovered = evaluator.decode(examples, mode)
  assert recovered.predictions == first.predictions
  assert 'decode cache entry' in capsys.readouterr().err
  assert json.loads(entry.read_text())['outputs']  # written whole again


def test_scores_losses_and_layer_accuracy(lm, decoder, examples):
  evaluator = engine.Evaluator(decoder, batch_size=8, progress=False)
  full = evaluator.decode(examples, modes.FullDepth())
  score = evaluator.score(examples, full.predictions)
  assert score.metric == 'f1' and set(score.scores) == {'f1', 'em'}
  perfect = evaluator.score(examples, examples.references)
  assert perfect.value == 100.0
  losses = evaluator.losses(examples, 'textual', full, full)
  np.testing.assert_array_equal(losses, np.zeros(5))
  accuracy = evaluator.layer_accuracy(examples)
  assert accuracy.shape == (4,) and np.all((0 <= accuracy) & (accuracy <= 1))


@pytest.mark.parametrize('encoder', [True, False])
def test_speedup_times_both_decoders_alternately(
  lm, decoder, examples, encoder
):
  """With the encoder, or the decode loops alone over contexts encoded
  before timing."""
  evaluator = engine.Evaluator(decoder, batch_size=4, progress=False)
  speed = evaluator.speedup(
    examples,
    modes.EarlyExit(lm.exit_config('softmax'), 0.0),
    batch_size=1,
    repeats=2,
    num_examples=3,
    encoder=encoder,
  )
  assert set(speed.median_seconds) == {'full', 'early'}
  assert speed.low <= speed.ratio <= speed.high or np.isclose(
    speed.low, speed.high
  )
  assert 0.05 < speed.ratio < 50


def test_every_process_gets_its_share_back_in_input_order():
  shares = [engine.process_share(7, i, 2) for i in range(2)]
  assert shares == [[0, 2, 4, 6], [1, 3, 5]]
  assert jax.process_count() == 1


def test_a_context_memo_encodes_each_input_once_and_changes_nothing(
  lm, examples
):
  """Decoding the same inputs in several modes through a context memo
  gives the plain decoder's outputs and runs the encoder once per batch;
  a model with other parameters gets its own contexts."""
  plain = engine.Evaluator(
    decoder_lib.Decoder(lm), batch_size=2, progress=False
  )
  memo = decoder_lib.ContextMemo()
  shared = engine.Evaluator(
    decoder_lib.Decoder(lm, contexts=memo), batch_size=2, progress=False
  )
  for mode in (
    modes.FullDepth(),
    modes.EarlyExit(lm.exit_config('softmax'), 0.5),
    modes.EarlyExit(lm.exit_config('state'), 0.9),
  ):
    assert (
      shared.decode(examples, mode).outputs
      == plain.decode(examples, mode).outputs
    )
  # 3 batches of 5 examples, each encoded once; every later look-up (the
  # compile's first batch included) hits: 3 modes x 4 look-ups - 3.
  assert (memo.misses, memo.hits) == (3, 9)
  other = dataclasses.replace(
    lm, params=jax.tree_util.tree_map(lambda x: x * 1.5, lm.params)
  )
  engine.Evaluator(
    decoder_lib.Decoder(other, contexts=memo), batch_size=2, progress=False
  ).decode(examples, modes.FullDepth())
  assert memo.misses == 6
  tiny = decoder_lib.ContextMemo(max_bytes=1)  # holds nothing
  engine.Evaluator(
    decoder_lib.Decoder(lm, contexts=tiny), batch_size=2, progress=False
  ).decode(examples, modes.FullDepth())
  assert tiny.hits == 0
