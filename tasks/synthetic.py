"""Deterministic generators of the embedded stand-in tasks (no TensorFlow).

Three text-to-text tasks stand in for the paper's three. Each example is a
pure function of (task, split, index), so a split is reproducible, any index
can be regenerated on its own, and the splits never share a seed. The text
looks like text: capitalised sentences, punctuation, real words and names
from several languages (Zoë Müller, Łukasz Wójcik, Kraków), so tokenisation
and the T5 metrics meet what they meet on real data. Every task mixes easy
tokens (fixed phrasing, copies) with tokens that need computation over the
input or over the output so far, and the summaries carry phrasing the
input cannot predict, as real summaries do:

  summarize  (CNN/DailyMail stand-in, about 38 tokens): a shuffled report of
             three offices' orders and managers, a sales change and
             distractors (a visitor, the weather, another city's old
             figure) -> a summary that ranks the offices by their orders
             (comparisons), writes the counts in words, names the manager
             of the office the ranking put first (a second lookup) and maps
             the sales change to up / down; the manager's role and the trend
             have two phrasings chosen at random (no cue in the input), so
             the full model cannot always reach the reference.
  translate  (WMT EN-FR stand-in): sentences of an English grammar ->
             pseudo-French: lexicon, noun-adjective order, gender and number
             agreement of articles, adjectives and verbs, negation around
             the verb (with elision), and a second clause whose pronoun
             agrees with the first clause's subject (il / elle / ils /
             elles): long-range agreement with what was generated earlier.
  qa         (SQuAD stand-in, 1-3 word answers): a question and a context
             of facts about three people; a quarter of the questions copy
             one fact's span, the others need a step more: how many animals
             a person owns (the sum of two counts, written in words), which
             of two people is older or younger (a comparison of two ages),
             or where the driver of a given vehicle lives (two hops).

Every input hashes into buckets owned by one split, so no input text occurs
in two splits.
"""

import hashlib
import random
from typing import Callable
from typing import Iterator

SPLITS = {'train': 2_000_000, 'validation': 1000, 'test': 1000}
# Every input hashes into one of 100 buckets and each split owns some of
# them (an example is redrawn until its input falls in its split's), so no
# input occurs in two splits, however small a task's space of sentences.
_SPLIT_BUCKETS = {
  'train': range(0, 80),
  'validation': range(80, 90),
  'test': range(90, 100),
}

_CITIES = (
  'Lyon Paris Berlin Madrid Rome Vienna Prague Oslo Dublin Lisbon '
  'Warsaw Athens Zürich Geneva Milan Naples Munich Hamburg Porto '
  'Seville Kraków Tallinn Riga Vilnius Sofia Málaga Göteborg '
  'Reykjavík'
).split()
_FIRST = (
  'Anna Bruno Clara David Élodie Felix Greta Hugo Irène Jonas Karla '
  'Lukas Marta Nora Óscar Paula Rafael Sara Tomás Ursula Víctor '
  'Wanda Yusuf Zoë Søren Łukasz'
).split()
_LAST = (
  'Smith Meyer Rossi Novák García Dubois Jensen Kowalski Silva '
  'Fischer Moreau Weber Costa Larsen Bauer Petit Romano Horváth López '
  'Schmidt Müller Núñez Øberg Wójcik'
).split()
_PRODUCTS = (
  'bicycle laptop camera printer tractor kettle lamp piano '
  'scooter blender drone guitar'
).split()
_WEEKDAYS = 'Monday Tuesday Wednesday Thursday Friday'.split()
_WEATHER = 'sunny rainy windy cloudy cold warm foggy'.split()
_PLACES = 'museum station harbour market library stadium bridge park'.split()

_UNITS = (
  'zero one two three four five six seven eight nine ten eleven '
  'twelve thirteen fourteen fifteen sixteen seventeen eighteen '
  'nineteen'
).split()
_TENS = 'twenty thirty forty fifty sixty seventy eighty ninety'.split()


def example_rng(
  task: str, split: str, index: int, seed: int = 0
) -> random.Random:
  """A Random seeded by (seed, task, split, index) through a stable hash."""
  key = f'{seed}/{task}/{split}/{index}'.encode()
  return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], 'big'))


def number_words(n: int) -> str:
  """2 -> 'two', 40 -> 'forty', 69 -> 'sixty-nine' (0 <= n < 100)."""
  if n < 20:
    return _UNITS[n]
  tens, units = divmod(n, 10)
  return _TENS[tens - 2] + ('' if units == 0 else '-' + _UNITS[units])


def _capitalised(text: str) -> str:
  return text[:1].upper() + text[1:]


# --- summarize ---------------------------------------------------------------

_OFFICE_FACTS = (
  'The {city} office reported {n} new orders on {day}.',
  'In {city}, the team booked {n} orders.',
  '{city} closed the week with {n} orders.',
)
_MANAGER_FACTS = (
  '{name} runs the {city} office.',
  'The {city} office is led by {name}.',
)


def summarize_example(rng: random.Random) -> dict:
  """Three offices' orders and managers, a sales change and distractors ->
  a summary that ranks the offices, writes their counts in words, names
  the leading office's manager and maps the sales change to up / down."""
  *cities, other_city = rng.sample(_CITIES, 4)
  orders = rng.sample(range(2, 100), 3)
  people = [
    f'{f} {l}' for f, l in zip(rng.sample(_FIRST, 4), rng.sample(_LAST, 4))
  ]
  managers, visitor = people[:3], people[3]
  percent = rng.randint(2, 60)
  product = rng.choice(_PRODUCTS)
  rose = rng.random() < 0.5
  sentences = [
    rng.choice(_OFFICE_FACTS).format(city=c, n=n, day=rng.choice(_WEEKDAYS))
    for c, n in zip(cities, orders)
  ]
  sentences += [
    rng.choice(_MANAGER_FACTS).format(name=m, city=c)
    for m, c in zip(managers, cities)
  ]
  sentences.append(
    f'Sales of the {product} {"rose" if rose else "fell"} by {percent} percent.'
  )
  distractors = [
    f'{visitor} visited the {rng.choice(_PLACES)}.',
    f'The weather in {other_city} was {rng.choice(_WEATHER)}.',
    f'Last year, {other_city} had {rng.randint(2, 99)} orders.',
  ]
  sentences += rng.sample(distractors, rng.randint(0, 2))
  rng.shuffle(sentences)
  ranked = sorted(zip(orders, cities, managers), reverse=True)
  (n1, lead, manager), (n2, second, _), (n3, third, _) = ranked
  # Phrasings with no cue in the input: a reference the full model cannot
  # always reach, as with real summaries.
  runs = rng.choice(('runs', 'heads'))
  trend = rng.choice(
    ('went up', 'climbed') if rose else ('went down', 'dropped')
  )
  summary = (
    f'{lead} led with {number_words(n1)} orders, ahead of {second} '
    f'with {number_words(n2)} and {third} with {number_words(n3)}. '
    f'{manager} {runs} the {lead} office, and sales of the '
    f'{product} {trend} {percent} percent.'
  )
  return {'inputs': ' '.join(sentences), 'targets': summary, 'kind': 'summary'}


# --- translate ---------------------------------------------------------------

# English noun -> (French noun, gender, French plural).
_NOUNS = {
  'cat': ('chat', 'm', 'chats'),
  'dog': ('chien', 'm', 'chiens'),
  'house': ('maison', 'f', 'maisons'),
  'car': ('voiture', 'f', 'voitures'),
  'book': ('livre', 'm', 'livres'),
  'table': ('table', 'f', 'tables'),
  'bird': ('oiseau', 'm', 'oiseaux'),
  'flower': ('fleur', 'f', 'fleurs'),
  'child': ('enfant', 'm', 'enfants'),
  'woman': ('femme', 'f', 'femmes'),
  'man': ('homme', 'm', 'hommes'),
  'city': ('ville', 'f', 'villes'),
  'apple': ('pomme', 'f', 'pommes'),
  'tree': ('arbre', 'm', 'arbres'),
  'letter': ('lettre', 'f', 'lettres'),
  'boat': ('bateau', 'm', 'bateaux'),
  'door': ('porte', 'f', 'portes'),
  'horse': ('cheval', 'm', 'chevaux'),
  'song': ('chanson', 'f', 'chansons'),
  'friend': ('ami', 'm', 'amis'),
  'teacher': ('professeur', 'm', 'professeurs'),
  'river': ('rivière', 'f', 'rivières'),
  'window': ('fenêtre', 'f', 'fenêtres'),
  'garden': ('jardin', 'm', 'jardins'),
}
_IRREGULAR_PLURALS = {'child': 'children', 'woman': 'women', 'man': 'men'}
# English adjective -> (masc. French, feminine, goes before the noun).
_ADJECTIVES = {
  'red': ('rouge', 'rouge', False),
  'green': ('vert', 'verte', False),
  'black': ('noir', 'noire', False),
  'white': ('blanc', 'blanche', False),
  'small': ('petit', 'petite', True),
  'big': ('grand', 'grande', True),
  'old': ('vieux', 'vieille', True),
  'new': ('nouveau', 'nouvelle', True),
  'happy': ('heureux', 'heureuse', False),
  'quiet': ('calme', 'calme', False),
  'beautiful': ('beau', 'belle', True),
  'blue': ('bleu', 'bleue', False),
  'pretty': ('joli', 'jolie', True),
  'round': ('rond', 'ronde', False),
}
# English verb (3rd singular, plural) -> French (singular, plural).
_VERBS = {
  ('sees', 'see'): ('voit', 'voient'),
  ('likes', 'like'): ('aime', 'aiment'),
  ('finds', 'find'): ('trouve', 'trouvent'),
  ('takes', 'take'): ('prend', 'prennent'),
  ('watches', 'watch'): ('regarde', 'regardent'),
  ('follows', 'follow'): ('suit', 'suivent'),
  ('paints', 'paint'): ('peint', 'peignent'),
  ('buys', 'buy'): ('achète', 'achètent'),
  ('wants', 'want'): ('veut', 'veulent'),
}
_PREPOSITIONS = {
  'near': 'près de',
  'behind': 'derrière',
  'in': 'dans',
  'under': 'sous',
  'with': 'avec',
}
_PRONOUNS = {
  ('m', False): 'il',
  ('f', False): 'elle',
  ('m', True): 'ils',
  ('f', True): 'elles',
}


def _plural_adjective(adjective: str) -> str:
  if adjective.endswith(('s', 'x')):
    return adjective
  return adjective + ('x' if adjective.endswith('eau') else 's')


def _noun_phrase(rng: random.Random, plural: bool) -> tuple[str, str, str]:
  """(English, pseudo-French, gender) of a random noun phrase."""
  noun = rng.choice(sorted(_NOUNS))
  fr_noun, gender, fr_plural = _NOUNS[noun]
  definite = rng.random() < 0.6
  adjective = rng.choice(sorted(_ADJECTIVES)) if rng.random() < 0.6 else None
  en_det = 'the' if definite else ('some' if plural else 'a')
  if plural:
    fr_det = 'les' if definite else 'des'
  else:
    fr_det = (
      ('le' if gender == 'm' else 'la')
      if definite
      else ('un' if gender == 'm' else 'une')
    )
  en_noun = _IRREGULAR_PLURALS.get(noun, noun + 's') if plural else noun
  fr_noun = fr_plural if plural else fr_noun
  if adjective is None:
    return f'{en_det} {en_noun}', f'{fr_det} {fr_noun}', gender
  masc, fem, before = _ADJECTIVES[adjective]
  fr_adj = fem if gender == 'f' else masc
  if plural:
    fr_adj = _plural_adjective(fr_adj)
  fr = (
    f'{fr_det} {fr_adj} {fr_noun}' if before else f'{fr_det} {fr_noun} {fr_adj}'
  )
  return f'{en_det} {adjective} {en_noun}', fr, gender


def _verb_phrase(
  rng: random.Random, plural: bool, negated: bool
) -> tuple[str, str]:
  """(English, French) of a conjugated verb, maybe negated: 'does not see'
  -> 'ne voit pas', 'do not like' -> "n'aiment pas" (elision)."""
  verb = rng.choice(sorted(_VERBS))
  fr = _VERBS[verb][1 if plural else 0]
  if not negated:
    return verb[1 if plural else 0], fr
  en = f'{"do" if plural else "does"} not {verb[1]}'
  return en, (f"n'{fr} pas" if fr[0] in 'aeiouéè' else f'ne {fr} pas')


def _with_preposition(preposition: str, noun_phrase: str) -> str:
  """French contracts 'de' with the article: de le -> du, de les -> des,
  de des -> de."""
  if preposition.endswith(' de'):
    head = preposition[:-3]
    for article, contracted in (
      ('le ', 'du '),
      ('les ', 'des '),
      ('des ', 'de '),
    ):
      if noun_phrase.startswith(article):
        return f'{head} {contracted}{noun_phrase[len(article) :]}'
  return f'{preposition} {noun_phrase}'


def translate_example(rng: random.Random) -> dict:
  """A sentence of one or two clauses -> pseudo-French."""
  plural = rng.random() < 0.4
  en_subj, fr_subj, gender = _noun_phrase(rng, plural)
  en_verb, fr_verb = _verb_phrase(rng, plural, rng.random() < 0.3)
  en_obj, fr_obj, _ = _noun_phrase(rng, rng.random() < 0.4)
  en, fr = [en_subj, en_verb, en_obj], [fr_subj, fr_verb, fr_obj]
  two_clauses = rng.random() < 0.5
  if not two_clauses and rng.random() < 0.6:
    prep = rng.choice(sorted(_PREPOSITIONS))
    en_pp, fr_pp, _ = _noun_phrase(rng, rng.random() < 0.4)
    en += [prep, en_pp]
    fr += [_with_preposition(_PREPOSITIONS[prep], fr_pp)]
  kind = 'one clause'
  if two_clauses:  # the pronoun agrees with the subject, far back
    en_verb2, fr_verb2 = _verb_phrase(rng, plural, rng.random() < 0.3)
    en_obj2, fr_obj2, _ = _noun_phrase(rng, rng.random() < 0.4)
    en[-1] += f', and {"they" if plural else "it"} {en_verb2} {en_obj2}'
    fr[-1] += f', et {_PRONOUNS[gender, plural]} {fr_verb2} {fr_obj2}'
    kind = 'two clauses'
  return {
    'inputs': 'translate English to French: '
    + _capitalised(' '.join(en))
    + '.',
    'targets': _capitalised(' '.join(fr)) + '.',
    'kind': kind,
  }


# --- qa ----------------------------------------------------------------------

_JOBS = (
  'baker teacher pilot farmer doctor painter nurse miner tailor sailor'
).split()
_FOODS = 'rice soup bread cheese apples pears fish honey'.split()
_PETS = 'goats sheep rabbits hens ducks cats'.split()
_COLOURS = 'red blue green yellow black white orange grey'.split()
_VEHICLES = 'car van truck bus'.split()
# Relation -> (the fact's sentence, the question, the answer's span).
_SPANS = {
  'city': ('{} lives in {}.', 'Where does {} live?'),
  'job': ('{} works as a {}.', 'What does {} do for a living?'),
  'food': ('{} likes {}.', 'What does {} like?'),
  'vehicle': ('{} drives {}.', 'What does {} drive?'),
}


def _span_fact(rng: random.Random, relation: str, name: str) -> tuple[str, str]:
  """(sentence, answer span) of a one-relation fact about `name`."""
  answer = {
    'city': lambda: rng.choice(_CITIES),
    'job': lambda: rng.choice(_JOBS),
    'food': lambda: rng.choice(_FOODS),
    'vehicle': lambda: f'{rng.choice(_COLOURS)} {rng.choice(_VEHICLES)}',
  }[relation]()
  shown = _indefinite(answer) if relation == 'vehicle' else answer
  return _SPANS[relation][0].format(name, shown), answer


def _indefinite(noun_phrase: str) -> str:
  """'orange van' -> 'an orange van', 'red car' -> 'a red car'."""
  return ('an ' if noun_phrase[0] in 'aeiou' else 'a ') + noun_phrase


def qa_example(rng: random.Random) -> dict:
  """Facts about three people -> the answer to one question. A quarter of
  the questions copy one fact's span; the rest need a step more: how many
  animals one person owns (the sum of two counts, in words), which of two
  people is older or younger (a comparison of their ages), or where the
  person who drives a given vehicle lives (two hops: vehicle -> person ->
  city, with every person's vehicle and city in the context)."""
  names = rng.sample(_FIRST, 3)
  kind = rng.choice(['span', 'sum', 'compare', 'hop'])
  relations = rng.sample(sorted(_SPANS), 3)
  facts = [_span_fact(rng, r, n)[0] for r, n in zip(relations, names)]
  if kind == 'span':
    sentence, answer = _span_fact(rng, relations[0], names[0])
    facts[0] = sentence
    question = _SPANS[relations[0]][1].format(names[0])
  elif kind == 'sum':
    (a, b), n, m = rng.sample(_PETS, 2), rng.randint(1, 9), rng.randint(1, 9)
    facts[0] = f'{names[0]} owns {n} {a} and {m} {b}.'
    question = f'How many animals does {names[0]} own?'
    answer = number_words(n + m)
  elif kind == 'compare':
    ages = rng.sample(range(18, 90), 2)
    facts[:2] = [
      f'{name} is {age} years old.' for name, age in zip(names, ages)
    ]
    older = rng.random() < 0.5
    question = (
      f'Who is {"older" if older else "younger"}, {names[0]} or {names[1]}?'
    )
    answer = names[ages.index(max(ages) if older else min(ages))]
  else:
    vehicles = [
      f'{c} {v}'
      for c, v in zip(rng.sample(_COLOURS, 3), rng.sample(_VEHICLES, 3))
    ]
    cities = rng.sample(_CITIES, 3)
    facts = [f'{n} drives {_indefinite(v)}.' for n, v in zip(names, vehicles)]
    facts += [f'{n} lives in {c}.' for n, c in zip(names, cities)]
    question = (
      f'Where does the person who drives {_indefinite(vehicles[0])} live?'
    )
    answer = cities[0]
  rng.shuffle(facts)
  return {
    'inputs': f'question: {question} context: {" ".join(facts)}',
    'targets': answer,
    'kind': kind,
  }


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
  'summarize': summarize_example,
  'translate': translate_example,
  'qa': qa_example,
}


def generate(task: str, split: str, index: int, seed: int = 0) -> dict:
  """Example `index` of `split` of `task`: {'inputs', 'targets', 'kind'}
  ('kind' names the example's sort: its question type, one or two clauses)."""
  if task not in GENERATORS:
    raise ValueError(
      f'unknown synthetic task {task!r}; valid: {", ".join(GENERATORS)}'
    )
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; valid: {", ".join(SPLITS)}')
  rng = example_rng(task, split, index, seed)
  while True:
    example = GENERATORS[task](rng)
    if split_of(example['inputs']) == split:
      return example


def split_of(inputs: str) -> str:
  """The split that owns an input text (by a stable hash of it)."""
  bucket = (
    int.from_bytes(hashlib.sha256(inputs.encode()).digest()[:4], 'big') % 100
  )
  return next(s for s, owned in _SPLIT_BUCKETS.items() if bucket in owned)


def examples(
  task: str, split: str, start: int = 0, seed: int = 0
) -> Iterator[dict]:
  """The examples of a split in order, from index `start`."""
  for index in range(start, SPLITS[split]):
    yield generate(task, split, index, seed)
