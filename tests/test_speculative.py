"""The exact mode: self-speculative decoding returns the full model's greedy
tokens and its sampling distribution, per row in a batch, for T5 and the
decoder-only family (tiny random models)."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from calm_jax.decoding import loops
from calm_jax.decoding import speculative
from calm_jax.model import llama
from calm_jax.model import models
from calm_jax.model import network

T5 = network.T5Config(
  vocab_size=32,
  emb_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_encoder_layers=1,
  num_decoder_layers=4,
)
LLAMA = llama.LlamaConfig(
  vocab_size=32,
  emb_dim=32,
  num_layers=4,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  rope_theta=10000.0,
)


def _model(family: str, seed: int = 0):
  model = models.CalmModel(T5) if family == 't5' else llama.CalmLlama(LLAMA)
  return model, model.init_params(jax.random.PRNGKey(seed))['params']


def _inputs(rows: int, seed: int, longest: int = 9) -> np.ndarray:
  """Ragged inputs [rows, longest], right-padded with 0."""
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, longest), np.int32)
  for row in range(rows):
    length = rng.integers(2, longest + 1)
    out[row, :length] = rng.integers(2, 32, length)
  return out


def _draft(model, measure='softmax', gamma=3, **options):
  return speculative.DraftConfig(
    model.exit_config(measure), gamma=gamma, **options
  )


def _decoders(model, draft, max_length, eos_id):
  static = jax.jit(
    lambda p, x: model.decode_static(p, x, max_length, eos_id=eos_id).tokens
  )
  exact = jax.jit(
    lambda p, x, t: model.decode_speculative(
      p, x, max_length, draft=draft, threshold=t, eos_id=eos_id
    )
  )
  return static, exact


# Llama's case is slow: `make test` keeps T5's, and the slow run's 2,000
# inputs cover both families.
@pytest.fixture(
  scope='module', params=['t5', pytest.param('llama', marks=pytest.mark.slow)]
)
def greedy_decoders(request):
  """Per family: params and the jitted static and exact decoders, shared
  by the threshold cases (the threshold is traced: compiled once)."""
  model, params = _model(request.param)
  # EOS 3 is a common token of these random models: drafts hit it often.
  return params, *_decoders(model, _draft(model), 12, eos_id=3)


@pytest.mark.parametrize('threshold', [0.0, 0.3])
def test_greedy_tokens_equal_the_full_model(greedy_decoders, threshold):
  params, static, exact = greedy_decoders
  for batch, seed in ((1, 1), (16, 3)):  # batch 1 and a batch of rows
    inputs = _inputs(batch, seed)
    out = exact(params, inputs, threshold)
    np.testing.assert_array_equal(out.tokens, static(params, inputs))
    assert (np.asarray(out.passes) >= 1).all()
    assert (np.asarray(out.accepted) <= np.asarray(out.drafted)).all()
    assert int(np.asarray(out.near_ties).sum()) == 0


# A top-2 logit gap under this is a tie: float rounding between the verify
# pass (a block of positions) and single steps may pick either token.
TIE_GAP = 1e-3


def _top2_gaps(model, params, inputs, tokens) -> np.ndarray:
  """The full model's top-2 logit gap at each position of `tokens`
  (teacher-forced), [b, t]."""
  logits = jax.jit(model.target_logits)(params, inputs, tokens)[-1]
  top2 = jax.lax.top_k(logits, 2)[0]
  return np.asarray(top2[..., 0] - top2[..., 1])


def _rows_split_at_a_tie(tokens, expected, gaps) -> int:
  """Asserts each row equals the full model's, or equals it up to a first
  difference at a tie (after which the two continuations differ, as two
  greedy decodes that broke a tie differently do); returns how many
  rows split at a tie. No row is skipped."""
  differ = np.asarray(tokens) != expected
  split = np.nonzero(differ.any(1))[0]
  for row in split:
    first = int(np.argmax(differ[row]))
    assert gaps[row, first] < TIE_GAP, (row, first, gaps[row, first])
  return len(split)


def _most_emitted_token(model, params) -> int:
  """The token a random model's full-depth greedy decodes emit most (not
  pad 0 or T5's 1): as EOS, it ends many rows inside a drafted block."""
  static, _ = _decoders(model, _draft(model), 12, eos_id=-1)
  tokens = np.asarray(static(params, _inputs(64, 99)))
  return int(np.bincount(tokens.ravel(), minlength=32)[2:].argmax()) + 2


@pytest.mark.slow
@pytest.mark.parametrize('family', ['t5', 'llama'])
def test_greedy_tokens_equal_the_full_model_on_2000_inputs(family):
  """Every row of 2,048 random ragged inputs (128 batches of 16, two
  models, four thresholds), with EOS a common token so drafts cross it:
  the full model's tokens, a row differing only from a tie on."""
  rows, eos_rows, split, near_ties = 0, 0, 0, 0
  for seed in range(2):
    model, params = _model(family, seed)
    eos_id = _most_emitted_token(model, params)
    static, exact = _decoders(model, _draft(model), 12, eos_id=eos_id)
    for batch_index in range(64):
      inputs = _inputs(16, 1000 * seed + batch_index)
      threshold = (0.0, 0.2, 0.5, 0.9)[batch_index % 4]
      out = exact(params, inputs, threshold)
      expected = np.asarray(static(params, inputs))
      gaps = _top2_gaps(model, params, inputs, expected)
      split += _rows_split_at_a_tie(out.tokens, expected, gaps)
      near_ties += int(np.asarray(out.near_ties).sum())
      rows += len(inputs)
      eos_rows += int(((expected == eos_id).any(1)).sum())
  assert rows >= 2000
  # Rows that stop at EOS: with blocks of 3 drafted tokens, a row's EOS is
  # usually drafted with tokens after it in the same block.
  assert eos_rows >= 100, eos_rows
  # Ties are rare, and a row splits only where the verify pass saw one.
  assert split <= near_ties < rows // 50, (split, near_ties)


@pytest.mark.slow
def test_a_confidence_bound_shortens_drafts_and_stays_exact():
  model, params = _model('t5')
  static, _ = _decoders(model, _draft(model), 12, eos_id=3)
  inputs = _inputs(8, 9)
  drafted = {}
  for bound in (0.0, 0.5):
    _, exact = _decoders(
      model, _draft(model, gamma=4, min_confidence=bound), 12, eos_id=3
    )
    out = exact(params, inputs, 0.0)
    np.testing.assert_array_equal(out.tokens, static(params, inputs))
    drafted[bound] = int(np.asarray(out.drafted).sum())
  assert drafted[0.5] < drafted[0.0]


def test_a_draft_that_always_agrees_is_accepted_whole():
  """At a threshold above 1 the draft runs every layer: the full model
  drafts, every draft is accepted, and a round emits gamma + 1 tokens."""
  model, params = _model('llama')
  _, exact = _decoders(model, _draft(model, gamma=3), 12, eos_id=-1)
  out = exact(params, _inputs(4, 5), 1.5)
  np.testing.assert_array_equal(out.accepted, out.drafted)
  np.testing.assert_array_equal(out.passes, [3, 3, 3, 3])  # 12 = 3 x 4


@pytest.mark.slow
def test_skipping_the_rollback_breaks_exactness(monkeypatch):
  """Verify must overwrite the cache entries a rejected draft wrote: with
  the draft's entries left in place, later positions read them and the
  tokens are no longer the full model's."""
  model, params = _model('t5')
  static, exact = _decoders(
    model, _draft(model, measure='softmax', forced_layer=1), 12, eos_id=-1
  )
  inputs = _inputs(16, 7)
  np.testing.assert_array_equal(
    exact(params, inputs, 0.0).tokens, static(params, inputs)
  )
  real_verify = speculative.verify

  def verify_without_rollback(fns, state, drafts):
    logits, _ = real_verify(fns, state, drafts)
    return logits, drafts.cache  # the draft's entries stay

  monkeypatch.setattr(speculative, 'verify', verify_without_rollback)
  _, broken = _decoders(
    model, _draft(model, measure='softmax', forced_layer=1), 12, eos_id=-1
  )
  assert not np.array_equal(
    broken(params, inputs, 0.0).tokens, static(params, inputs)
  )


def _first_tokens(model, params, draft, rows, prompt, sampling, seed):
  """The first 3 tokens of `rows` samples from one prompt: plain sampling
  and the exact mode."""
  prompts = np.repeat(prompt[None], rows, 0)
  plain = jax.jit(
    lambda p, x, r: (
      model.decode_static(p, x, 3, eos_id=-1, sampling=sampling, rng=r).tokens
    )
  )
  draft = dataclasses.replace(
    draft, exits=dataclasses.replace(draft.exits, sampling=sampling)
  )
  exact = jax.jit(
    lambda p, x, r: (
      model.decode_speculative(
        p, x, 3, draft=draft, threshold=0.0, eos_id=-1, rng=r
      ).tokens
    )
  )
  # One batch of equal prompts: each row samples from its own key
  # (`loops.row_keys`), so the rows are independent samples.
  plain_key, exact_key = jax.random.split(jax.random.PRNGKey(seed))
  return (
    np.asarray(plain(params, prompts, plain_key)),
    np.asarray(exact(params, prompts, exact_key)),
  )


def _chi_square(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
  """p-value of 'both samples come from one distribution' over the joint
  outcomes of their rows."""
  code = lambda t: (t * vocab ** np.arange(t.shape[1])).sum(1)
  cells = np.union1d(code(a), code(b))
  counts = np.stack([[np.sum(code(x) == c) for c in cells] for x in (a, b)])
  counts = counts[:, counts.sum(0) >= 5]  # sparse cells merged away
  return stats.chi2_contingency(counts)[1]


@pytest.mark.parametrize(
  'forced_layer, samples',
  [
    pytest.param(None, 3000, marks=pytest.mark.slow),
    (1, 3000),
    pytest.param(None, 20000, marks=pytest.mark.slow),
    pytest.param(1, 20000, marks=pytest.mark.slow),
  ],
)
def test_sampling_has_the_full_models_distribution(forced_layer, samples):
  """Rejection sampling: the first 3 tokens' joint distribution equals
  plain sampling's, with the confident draft and with a bad one (every
  token forced out at layer 1, far from the top)."""
  config = dataclasses.replace(LLAMA, vocab_size=8)
  model = llama.CalmLlama(config)
  params = model.init_params(jax.random.PRNGKey(4))['params']
  sampling = loops.Sampling(temperature=1.0)
  draft = speculative.DraftConfig(
    model.exit_config('softmax'), gamma=2, forced_layer=forced_layer
  )
  plain, exact = _first_tokens(
    model,
    params,
    draft,
    samples,
    np.array([3, 5, 2, 6], np.int32),
    sampling,
    0,
  )
  assert _chi_square(plain, exact, 8) > 0.01


def test_the_exact_mode_through_the_api_and_the_decode_job(
  tiny_model_dir, tmp_path
):
  import calm_jax  # pylint: disable=g-import-not-at-top

  import entry_points  # pylint: disable=g-import-not-at-top

  lm = calm_jax.load(str(tiny_model_dir))
  texts = [
    f'question: Who drives car {i}? context: Anna drives car {i}.'
    for i in range(5)
  ]
  full = lm.generate(texts, threshold=1.5, batch_size=4, max_length=6)
  exact = lm.generate(
    texts, threshold=0.0, batch_size=4, max_length=6, mode='exact', gamma=3
  )
  assert [r.tokens for r in exact] == [r.tokens for r in full]
  counts = exact[0].speculative
  assert counts['passes'] >= 1 and counts['drafted'] >= counts['accepted']
  out = tmp_path / 'decode'
  result = entry_points.run_module(
    'calm_jax.decode',
    '--gin_file=gin/runs/decode.gin',
    f"--gin.MODEL_DIR='{tiny_model_dir}'",
    "--gin.MIXTURE_OR_TASK_NAME='synth_qa'",
    "--gin.MODE='exact'",
    '--gin.THRESHOLD=0.0',
    '--gin.calm_jax.DecodeInputs.num_examples=4',
    '--gin.calm_jax.RunSettings.batch_size=4',
    f"--gin.OUTPUT_DIR='{out}'",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  import json  # pylint: disable=g-import-not-at-top

  summary = json.loads((out / 'summary.json').read_text())
  exact_mode = summary['tasks']['synth_qa']['exact_mode']
  assert 0 <= exact_mode['acceptance_rate'] <= 1
  assert exact_mode['tokens_per_pass'] >= 1
  run = json.loads((out / 'run.json').read_text())
  assert run['exact']['exact']['gamma'] == 4
