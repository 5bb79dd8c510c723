"""Embedded tasks: generators, vocabulary, SeqIO registration."""

import collections
import re

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
    synthetic.generate('qa', 'validation', 999),
  ]


@pytest.mark.parametrize('task', sorted(synthetic.GENERATORS))
def test_splits_never_share_an_input(task):
  inputs = {
    split: {synthetic.generate(task, split, i)['inputs'] for i in range(count)}
    for split, count in (('train', 3000), ('validation', 1000), ('test', 1000))
  }
  assert not inputs['train'] & inputs['validation']
  assert not inputs['train'] & inputs['test']
  assert not inputs['validation'] & inputs['test']
  for split, texts in inputs.items():
    assert {synthetic.split_of(t) for t in texts} == {split}


_WORDS_TO_NUMBER = {synthetic.number_words(n): n for n in range(100)}
_SUMMARY = re.compile(
  r'(\S+) led with ([\w-]+) orders, ahead of (\S+) with ([\w-]+) and (\S+) '
  r'with ([\w-]+)\. (\S+ \S+) (?:runs|heads) the (\S+) office, and sales '
  r'of the (\w+) (went up|climbed|went down|dropped) (\d+) percent\.'
)
_OFFICE = re.compile(
  r'(?:The (\S+) office reported (\d+) new orders|In '
  r'(\S+), the team booked (\d+) orders|(\S+) closed the '
  r'week with (\d+) orders)'
)


def test_summary_ranks_the_offices_and_names_the_leaders_manager():
  lengths, rewritten = [], []
  for i in range(200):
    ex = synthetic.generate('summarize', 'validation', i)
    match = _SUMMARY.fullmatch(ex['targets'])
    assert match, ex['targets']
    lead, w1, second, w2, third, w3, manager, office, product, trend, pct = (
      match.groups()
    )
    offices = {}
    for groups in _OFFICE.findall(ex['inputs']):
      city, n = [g for g in groups if g]
      offices[city] = int(n)
    ranked = [(lead, w1), (second, w2), (third, w3)]
    # The comparison: the three offices of the input, most orders first,
    # their counts rewritten in words; the distractor city is not one.
    assert {c: _WORDS_TO_NUMBER[w] for c, w in ranked} == offices
    counts = [offices[c] for c, _ in ranked]
    assert counts == sorted(counts, reverse=True)
    # The hop: the manager of the office that the comparison picked.
    assert office == lead
    assert (
      f'{manager} runs the {lead} office' in ex['inputs']
      or f'The {lead} office is led by {manager}' in ex['inputs']
    )
    change = 'rose' if trend in ('went up', 'climbed') else 'fell'
    assert f'Sales of the {product} {change} by {pct} percent' in (ex['inputs'])
    lengths.append(len(ex['targets'].split()))
    words = re.findall(r'[\w-]+', ex['targets'])
    rewritten.append(np.mean([w not in ex['inputs'] for w in words]))
  assert np.mean(lengths) >= 25  # words; about 38 tokens with EOS
  # The mix: about two words in three are copies of the input (the ranked
  # cities and the manager among them, whose choice needs the comparison
  # and the hop); the rest are fixed phrasing, counts in words, up / down.
  assert 0.2 < np.mean(rewritten) < 0.5, np.mean(rewritten)


def _qa_fact_answer(context: str, person: str, relation: str) -> str:
  return re.search(f'{person} {relation} ([^.]+)\\.', context).group(1)


def test_qa_mixes_copies_with_questions_that_need_more_than_one_fact():
  kinds = collections.Counter()
  for i in range(400):
    ex = synthetic.generate('qa', 'validation', i)
    question, context = ex['inputs'].split(' context: ')
    kinds[ex['kind']] += 1
    answer = ex['targets']
    if ex['kind'] == 'span':
      person = [
        w.rstrip('?')
        for w in question.split()
        if w.rstrip('?') in synthetic._FIRST
      ][0]
      relation = next(
        r
        for q, r in (
          ('live', 'lives in'),
          ('do for', 'works as a'),
          ('like', 'likes'),
          ('drive', 'drives an?'),
        )
        if q in question
      )
      assert _qa_fact_answer(context, person, relation) == answer
    elif ex['kind'] == 'sum':  # one fact, two counts added
      n, m = map(int, re.findall(r'owns (\d+) \w+ and (\d+)', context)[0])
      assert answer == synthetic.number_words(n + m)
    elif ex['kind'] == 'compare':  # two facts compared
      a, b = re.findall(r'Who is \w+, (\S+) or (\S+)\?', question)[0]
      age = {
        p: int(_qa_fact_answer(context, p, 'is').split()[0]) for p in (a, b)
      }
      pick = max if 'older' in question else min
      assert answer == pick(age, key=age.get)
    else:  # two hops: vehicle -> driver -> city
      vehicle = re.search(r'drives an? (\w+ \w+) live', question).group(1)
      driver = re.search(f'(\\S+) drives an? {vehicle}\\.', context).group(1)
      assert _qa_fact_answer(context, driver, 'lives in') == answer
      assert answer not in re.search(f'[^.]* {vehicle}\\.', context).group()
  shares = {k: v / 400 for k, v in kinds.items()}
  assert set(shares) == {'span', 'sum', 'compare', 'hop'}
  assert all(0.15 < s < 0.35 for s in shares.values()), shares
  # Three in four answers need arithmetic, a comparison or a second hop.
  assert 1 - shares['span'] > 0.65


def test_translation_agrees_in_gender_and_number_and_far_back():
  ex = synthetic.translate_example(synthetic.example_rng('t', 'x', 0))
  assert ex['inputs'].startswith('translate English to French: ')
  seen = collections.Counter()
  for i in range(300):
    ex = synthetic.generate('translate', 'validation', i)
    en = ex['inputs'].split(': ', 1)[1].rstrip('.').split()
    fr = ex['targets'].rstrip('.').split()
    if en[0] == 'The' and en[1] in ('house', 'car', 'flower'):
      assert fr[0] == 'La'
      seen['feminine'] += 1
    if (
      en[0] == 'The' and en[1] in ('red', 'green') and en[2] in ('cats', 'dogs')
    ):
      assert fr[:3] == [
        'Les',
        {'cats': 'chats', 'dogs': 'chiens'}[en[2]],
        {'red': 'rouges', 'green': 'verts'}[en[1]],
      ]
      seen['plural'] += 1
    first_en = ex['inputs'].split(', and ')[0].split()
    first_fr = ex['targets'].split(', et ')[0].split()
    assert ('not' in first_en) == ('pas' in first_fr)  # ne ... pas
    seen['negation'] += 'not' in first_en
    if ex['kind'] == 'two clauses':  # the pronoun agrees with the subject
      noun = next(
        w
        for w in en[1:4]
        if w.rstrip(',') in synthetic._NOUNS
        or w in ('children', 'women', 'men')
        or w[:-1] in synthetic._NOUNS
      )
      singular = {'children': 'child', 'women': 'woman', 'men': 'man'}.get(
        noun, noun if noun in synthetic._NOUNS else noun[:-1]
      )
      gender = synthetic._NOUNS[singular][1]
      plural = singular != noun
      pronoun = fr[fr.index('et') + 1]
      assert pronoun == synthetic._PRONOUNS[gender, plural], ex
      seen['pronoun'] += 1
  assert min(seen[k] for k in ('feminine', 'plural', 'negation')) > 0
  assert 100 < seen['pronoun'] < 200


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
    ds = seqio.get_dataset(
      name, lengths, converter, dataset_split='validation', shuffle=False
    )
    batch = next(ds.batch(8).as_numpy_iterator())
    assert batch['encoder_input_tokens'].shape == (8, lengths['inputs'])
    assert batch['decoder_target_tokens'].shape == (8, lengths['targets'])
    np.testing.assert_array_equal(
      batch['decoder_input_tokens'][:, 1:],
      batch['decoder_target_tokens'][:, :-1],
    )
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
