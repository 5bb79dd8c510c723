"""Embedded tasks: generators, vocabulary, SeqIO registration."""
import numpy as np
import pytest

from calm_jax.tasks import synthetic


def test_generators_are_deterministic_and_splits_differ():
  for task in synthetic.GENERATORS:
    a = [synthetic.generate(task, 'train', i) for i in range(5)]
    b = [synthetic.generate(task, 'train', i) for i in range(5)]
    assert a == b
    assert a != [synthetic.generate(task, 'validation', i) for i in range(5)]
    assert synthetic.generate(task, 'train', 3, seed=1) != a[3]
  assert list(synthetic.examples('qa', 'validation', start=998)) == [
      synthetic.generate('qa', 'validation', 998),
      synthetic.generate('qa', 'validation', 999)]


def test_qa_answer_is_the_span_after_the_asked_relation():
  relation_words = {'where does': 'lives in', 'job of': 'works as a',
                    'own': 'owns', 'like': 'likes', 'drive': 'drives a'}
  for i in range(100):
    ex = synthetic.generate('qa', 'train', i)
    question, context = ex['inputs'].split(' context: ')
    person = [w for w in question.split()[1:] if w in synthetic._FIRST][0]
    relation = [r for q, r in relation_words.items()
                if f' {q} ' in question + ' '][0]
    assert f'{person} {relation} {ex["targets"]} .' in context
    assert len(ex['targets'].split()) in (1, 2)


def test_summary_copies_key_facts_not_distractors():
  for i in range(50):
    ex = synthetic.generate('summarize', 'train', i)
    city = ex['targets'].split(' : ')[0]
    words = ex['targets'].split(' : ')[1].split(' orders')[0]
    orders = [n for n in range(2, 100) if synthetic.number_words(n) == words]
    assert len(orders) == 1
    assert f'the {city} office reported {orders[0]} new orders' in ex['inputs']
    change = 'rose' if ' up ' in ex['targets'] else 'fell'
    assert f' {change} by ' in ex['inputs']
    manager = ex['targets'].split(' says ')[1].rstrip(' .')
    assert f'manager {manager} said' in ex['inputs']


def test_translation_agrees_in_gender_and_number():
  ex = synthetic.translate_example(synthetic.example_rng('t', 'x', 0))
  assert ex['inputs'].startswith('translate English to French: ')
  seen = set()
  for i in range(300):
    ex = synthetic.generate('translate', 'train', i)
    en, fr = ex['inputs'].split(': ', 1)[1].split(), ex['targets'].split()
    if en[0] == 'the' and en[1] in ('house', 'car', 'flower'):
      assert fr[0] == 'la'
      seen.add('f')
    if en[0] == 'the' and en[1] in ('red', 'green') and en[2] in ('cats',
                                                                  'dogs'):
      assert fr[:3] == ['les', {'cats': 'chats', 'dogs': 'chiens'}[en[2]],
                        {'red': 'rouges', 'green': 'verts'}[en[1]]]
      seen.add('p')
  assert seen == {'f', 'p'}


@pytest.fixture(scope='module')
def seqio_tasks():
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks.synthetic_tasks as st  # pylint: disable=g-import-not-at-top
  return seqio, st


def test_vocabulary_round_trips_text(seqio_tasks):
  _, st = seqio_tasks
  vocab = st.VOCABULARY
  assert 300 < vocab.vocab_size <= 1024
  for task in synthetic.GENERATORS:
    ex = synthetic.generate(task, 'validation', 0)
    for text in ex.values():
      ids = vocab.encode(text)
      assert 2 not in ids  # no unknown pieces
      assert vocab.decode(ids) == text


def test_tasks_yield_encdec_batches_that_fit(seqio_tasks):
  seqio, st = seqio_tasks
  converter = seqio.EncDecFeatureConverter(pack=False)
  for name, lengths in st.FEATURE_LENGTHS.items():
    ds = seqio.get_dataset(name, lengths, converter,
                           dataset_split='validation', shuffle=False)
    batch = next(ds.batch(8).as_numpy_iterator())
    assert batch['encoder_input_tokens'].shape == (8, lengths['inputs'])
    assert batch['decoder_target_tokens'].shape == (8, lengths['targets'])
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                  batch['decoder_target_tokens'][:, :-1])
    # Nothing was trimmed: every row still ends with EOS (1).
    for row in batch['decoder_target_tokens']:
      assert 1 in row
    for row in batch['encoder_input_tokens']:
      assert 1 in row
  mixture = seqio.get_mixture_or_task(st.MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == sorted(st.TASKS)


def test_task_metrics_score_perfect_predictions(seqio_tasks):
  seqio, _ = seqio_tasks
  ex = synthetic.generate('qa', 'validation', 0)
  task = seqio.get_mixture_or_task('synth_qa')
  scores = task.metric_fns[0]([ex['targets']], [ex['targets']])
  assert scores == {'f1': 100.0, 'em': 100.0}
