"""The real-text prompt set, exit adapters and the layer study on a tiny
random Llama (the SmolLM2 measurements themselves: make real-model)."""

import dataclasses

import jax
import numpy as np
import pytest

from calm_jax.analysis import lens
from calm_jax.data import examples as examples_lib
from calm_jax.evaluation import engine
from calm_jax.inference import decoder as decoder_lib
from calm_jax.inference import loaded as loaded_lib
from calm_jax.inference import modes
from calm_jax.model import adapters
from calm_jax.model import llama
from calm_jax.tasks import real_text


def test_the_prompt_set_is_real_text_in_fixed_disjoint_splits():
  prompts = real_text.prompts()
  assert len(prompts) >= 400
  assert prompts == real_text.prompts()  # deterministic
  kinds = {p.kind for p in prompts}
  assert kinds == set(real_text.KINDS)
  for split in real_text.SPLITS:
    count = sum(p.split == split for p in prompts)
    assert count >= 200, split
  texts = {p.split: set() for p in prompts}
  for p in prompts:
    texts[p.split].add(p.text)
  assert not texts['calibration'] & texts['test']
  source = prompts[0].source
  assert {'module', 'object', 'paragraph', 'python'} <= set(source)
  assert source['module'] in real_text.MODULES


def test_a_prefix_of_a_split_samples_all_of_it():
  """The first 64 prompts of a split come from across the module list,
  not from its first modules alphabetically."""
  modules = sorted(real_text.MODULES)
  for name in real_text.SPLITS:
    head = real_text.split(name, 64)
    assert len(head) == 64
    assert {p.kind for p in head} == set(real_text.KINDS)
    ranks = [modules.index(p.source['module']) for p in head]
    assert len(set(ranks)) >= 20
    assert min(ranks) < len(modules) // 4 and max(ranks) > 3 * len(modules) // 4


@pytest.mark.parametrize(
  'text, prose',
  [
    ('word ' * 30 + 'end.', True),
    ('word ' * 10 + 'end.', False),  # too short
    ('>>> f(x)\n' + 'word ' * 30 + '.', False),  # a doctest
    ('x = {1: 2} ' * 20 + '.', False),  # mostly symbols
  ],
)
def test_prose_paragraphs_are_told_from_code(text, prose):
  assert real_text.is_prose(text) == prose


def test_adapters_recover_an_affine_map():
  rng = np.random.default_rng(0)
  top = rng.normal(size=(2000, 8)).astype(np.float32)
  true_kernel = rng.normal(size=(8, 8)).astype(np.float32)
  lower = (top - 0.5) @ np.linalg.inv(true_kernel)  # top = lower A + b
  fitted = adapters.fit(np.stack([lower, top]), ridge=1e-6)
  assert fitted['kernel'].shape == (3, 8, 8)
  np.testing.assert_allclose(fitted['kernel'][0], np.eye(8))  # embedding
  np.testing.assert_allclose(fitted['kernel'][2], np.eye(8))  # the top
  np.testing.assert_allclose(
    lower @ fitted['kernel'][1] + fitted['bias'][1], top, atol=1e-3
  )


@pytest.fixture(scope='module')
def tiny():
  config = llama.LlamaConfig(
    vocab_size=64,
    emb_dim=16,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=32,
  )
  model = llama.CalmLlama(config)
  params = model.init_params(jax.random.PRNGKey(0))['params']
  return loaded_lib.in_memory(model, params)


class _Ids:
  """Ids as text, for a model without a tokenizer."""

  def decode(self, ids):
    return ' '.join(map(str, ids))

  def pieces(self, ids):
    return [str(i) for i in ids]


def _examples(tiny):
  rng = np.random.default_rng(1)
  rows = tuple(
    examples_lib.Example(
      inputs=str(i),
      input_ids=tuple(rng.integers(3, 64, rng.integers(2, 7)).tolist()),
    )
    for i in range(5)
  )
  return examples_lib.ExampleSet(
    name='tiny',
    fingerprint={'n': 5},
    lengths={'inputs': 8, 'targets': 6},
    examples=rows,
    vocabulary=_Ids(),
    eos_id=-1,
  )


def test_states_of_the_own_generation_reproduce_it_and_adapters_join(tiny):
  examples = _examples(tiny)
  evaluator = engine.Evaluator(
    decoder_lib.Decoder(tiny, eos_id=-1), batch_size=4, progress=False
  )
  full = evaluator.decode(examples, modes.FullDepth())
  states = lens.generated_states(tiny, examples, full, batch_size=4)
  assert states.hidden.shape == (3, 5 * 6, 16)
  agreement = lens.agreement(tiny, states)
  assert agreement[-1] == 1.0  # the top predicts its own greedy tokens
  fitted = adapters.fit(states.hidden)
  adapted = dataclasses.replace(
    tiny, params={**tiny.params, llama.ADAPTERS: fitted}
  )
  # The top's adapter is the identity: its predictions do not move.
  assert lens.agreement(adapted, states)[-1] == 1.0
  assert adapted.fingerprint('softmax')['adapters']
  assert 'adapters' not in adapted.fingerprint('full')
  # Decoding reads through the adapters: at threshold 0 every token exits
  # at layer 1 and takes layer 1's adapted prediction.
  config = adapted.exit_config('softmax')
  early = engine.Evaluator(
    decoder_lib.Decoder(adapted, eos_id=-1), batch_size=4, progress=False
  ).decode(examples, modes.EarlyExit(config, 0.0))
  predictions = lens.exit_predictions(adapted, states)
  first = [row[0] for row in early.exit_layers]
  assert set(first) == {1}
  first_tokens = [out['token_ids'][0] for out in early.outputs]
  starts = np.cumsum([0] + [6] * 4)
  assert first_tokens == predictions[0, starts].tolist()


def test_the_classifier_learns_a_separable_label():
  rng = np.random.default_rng(2)
  inputs = rng.normal(size=(3, 400, 6)).astype(np.float32)
  labels = inputs[..., 0] > 0.3
  classifier = lens.fit_classifier(inputs, labels, steps=200)
  accuracy = lens.classifier_accuracy(
    classifier, inputs.reshape(-1, 6), labels.reshape(-1)
  )
  assert accuracy > 0.95
