"""Deterministic generators of the embedded stand-in tasks (no TensorFlow).

Three text-to-text tasks stand in for the paper's three. Each example is a
pure function of (task, split, index), so a split is reproducible, any index
can be regenerated on its own, and the splits never share a seed. Every task
mixes easy tokens (fixed phrasing, agreement endings, EOS) with hard ones
(the entity or number that must be found and copied), so that a multi-exit
model shows a spread of exit layers:

  summarize  (CNN/DailyMail stand-in): a shuffled multi-sentence report with
             distractor sentences -> a one-line summary that copies the key
             city, product and manager into fixed phrasing, writes the order
             count in words and the sales change as up / down.
  translate  (WMT EN-FR stand-in): sentences of a small English grammar ->
             pseudo-French (lexicon, noun-adjective reordering, gender and
             number agreement of articles, adjectives and verbs).
  qa         (SQuAD stand-in): a question about one of three people and a
             context of facts about them -> the answer span copied from the
             context.
"""
import hashlib
import random
from typing import Callable, Iterator

SPLITS = {'train': 2_000_000, 'validation': 1000, 'test': 1000}

_CITIES = ('lyon paris berlin madrid rome vienna prague oslo dublin lisbon '
           'warsaw athens zurich geneva milan naples munich hamburg porto '
           'seville krakow tallinn riga vilnius sofia').split()
_FIRST = ('anna bruno clara david elena felix greta hugo irene jonas karla '
          'lukas marta nora oscar paula rafael sara tomas ursula victor '
          'wanda yusuf zoe').split()
_LAST = ('smith meyer rossi novak garcia dubois jensen kowalski silva '
         'fischer moreau weber costa larsen bauer petit romano horvat '
         'lopez schmidt').split()
_PRODUCTS = ('bicycle laptop camera printer tractor kettle lamp piano '
             'scooter blender drone guitar').split()
_WEEKDAYS = 'monday tuesday wednesday thursday friday'.split()
_WEATHER = 'sunny rainy windy cloudy cold warm foggy'.split()
_PLACES = 'museum station harbour market library stadium bridge park'.split()
_ANIMALS = 'fox deer heron badger swan owl'.split()
_MOODS = 'excellent solid weak surprising disappointing strong'.split()

# English noun -> (French noun, gender, French plural).
_NOUNS = {
    'cat': ('chat', 'm', 'chats'), 'dog': ('chien', 'm', 'chiens'),
    'house': ('maison', 'f', 'maisons'), 'car': ('voiture', 'f', 'voitures'),
    'book': ('livre', 'm', 'livres'), 'table': ('table', 'f', 'tables'),
    'bird': ('oiseau', 'm', 'oiseaux'), 'flower': ('fleur', 'f', 'fleurs'),
    'child': ('enfant', 'm', 'enfants'), 'woman': ('femme', 'f', 'femmes'),
    'man': ('homme', 'm', 'hommes'), 'city': ('ville', 'f', 'villes'),
    'apple': ('pomme', 'f', 'pommes'), 'tree': ('arbre', 'm', 'arbres'),
    'letter': ('lettre', 'f', 'lettres'), 'boat': ('bateau', 'm', 'bateaux'),
    'door': ('porte', 'f', 'portes'), 'horse': ('cheval', 'm', 'chevaux'),
    'song': ('chanson', 'f', 'chansons'), 'friend': ('ami', 'm', 'amis'),
    'teacher': ('professeur', 'm', 'professeurs'),
    'river': ('rivière', 'f', 'rivières'), 'window': ('fenêtre', 'f',
                                                       'fenêtres'),
    'garden': ('jardin', 'm', 'jardins'),
}
# English adjective -> (masc. French, feminine, goes before the noun).
_ADJECTIVES = {
    'red': ('rouge', 'rouge', False), 'green': ('vert', 'verte', False),
    'black': ('noir', 'noire', False), 'white': ('blanc', 'blanche', False),
    'small': ('petit', 'petite', True), 'big': ('grand', 'grande', True),
    'old': ('vieux', 'vieille', True), 'new': ('nouveau', 'nouvelle', True),
    'happy': ('heureux', 'heureuse', False), 'quiet': ('calme', 'calme',
                                                       False),
    'beautiful': ('beau', 'belle', True), 'blue': ('bleu', 'bleue', False),
    'pretty': ('joli', 'jolie', True), 'round': ('rond', 'ronde', False),
}
# English verb (3rd singular, plural) -> French (singular, plural).
_VERBS = {
    ('sees', 'see'): ('voit', 'voient'), ('likes', 'like'): ('aime',
                                                              'aiment'),
    ('finds', 'find'): ('trouve', 'trouvent'), ('takes', 'take'): ('prend',
                                                                    'prennent'),
    ('watches', 'watch'): ('regarde', 'regardent'),
    ('follows', 'follow'): ('suit', 'suivent'),
    ('paints', 'paint'): ('peint', 'peignent'),
    ('buys', 'buy'): ('achète', 'achètent'),
    ('wants', 'want'): ('veut', 'veulent'),
}
_PREPOSITIONS = {'near': 'près de', 'behind': 'derrière', 'in': 'dans',
                 'under': 'sous', 'with': 'avec'}

_JOBS = ('baker teacher pilot farmer doctor painter nurse miner tailor '
         'sailor').split()
_PETS = 'cats dogs horses goats sheep rabbits hens ducks'.split()
_FOODS = 'rice soup bread cheese apples pears fish honey'.split()
# Relation -> (sentence template around the answer, answer generator).
_RELATIONS = {
    'lives': lambda rng: ('lives in {}', rng.choice(_CITIES)),
    'works': lambda rng: ('works as a {}', rng.choice(_JOBS)),
    'owns': lambda rng: ('owns {}', f'{rng.randint(2, 20)} '
                         f'{rng.choice(_PETS)}'),
    'likes': lambda rng: ('likes {}', rng.choice(_FOODS)),
    'drives': lambda rng: ('drives a {}', f'{rng.choice(_COLORS)} '
                           f'{rng.choice(["car", "van", "truck", "bus"])}'),
}
_QUESTIONS = {
    'lives': 'where does {} live ?', 'works': 'what is the job of {} ?',
    'owns': 'what does {} own ?', 'likes': 'what does {} like ?',
    'drives': 'what does {} drive ?',
}
_COLORS = ('red blue green yellow black white orange purple brown grey '
           'pink golden').split()

def example_rng(task: str, split: str, index: int, seed: int = 0
                ) -> random.Random:
  """A Random seeded by (seed, task, split, index) through a stable hash."""
  key = f'{seed}/{task}/{split}/{index}'.encode()
  return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], 'big'))


def _sentence(words: list[str]) -> str:
  return ' '.join(words) + ' .'


_UNITS = ('zero one two three four five six seven eight nine ten eleven '
          'twelve thirteen fourteen fifteen sixteen seventeen eighteen '
          'nineteen').split()
_TENS = 'twenty thirty forty fifty sixty seventy eighty ninety'.split()


def number_words(n: int) -> str:
  """2 -> 'two', 40 -> 'forty', 69 -> 'sixty nine' (0 <= n < 100)."""
  if n < 20:
    return _UNITS[n]
  tens, units = divmod(n, 10)
  return _TENS[tens - 2] + ('' if units == 0 else ' ' + _UNITS[units])


def summarize_example(rng: random.Random) -> dict[str, str]:
  """Report with three key facts and 1-3 distractors -> fixed-form summary.

  Beyond copying, the summary rewrites: the order count in words, and the
  sales change as up / down.
  """
  city, other_city = rng.sample(_CITIES, 2)
  first, other_first = rng.sample(_FIRST, 2)
  last, other_last = rng.sample(_LAST, 2)
  orders, percent = rng.randint(2, 99), rng.randint(2, 60)
  product, mood = rng.choice(_PRODUCTS), rng.choice(_MOODS)
  rose = rng.random() < 0.5
  key = [
      f'the {city} office reported {orders} new orders on '
      f'{rng.choice(_WEEKDAYS)} .',
      f'manager {first} {last} said the results were {mood} .',
      f'sales of the {product} {"rose" if rose else "fell"} by {percent} '
      'percent .',
  ]
  distractors = [
      f'the weather in {other_city} was {rng.choice(_WEATHER)} .',
      f'{other_first} {other_last} visited the {rng.choice(_PLACES)} .',
      f'a {rng.choice(_ANIMALS)} was seen near the {rng.choice(_PLACES)} .',
      f'the {other_city} office reported {rng.randint(2, 99)} old orders .',
  ]
  sentences = key + rng.sample(distractors, rng.randint(1, 3))
  rng.shuffle(sentences)
  summary = (f'{city} : {number_words(orders)} orders , {product} '
             f'{"up" if rose else "down"} {percent} percent , {mood} says '
             f'{first} {last} .')
  return {'inputs': ' '.join(sentences), 'targets': summary}


def _noun_phrase(rng: random.Random, plural: bool) -> tuple[str, str]:
  """Random English noun phrase and its pseudo-French translation."""
  noun = rng.choice(sorted(_NOUNS))
  fr_noun, gender, fr_plural = _NOUNS[noun]
  definite = rng.random() < 0.6
  adjective = rng.choice(sorted(_ADJECTIVES)) if rng.random() < 0.6 else None
  en_det = 'the' if definite else ('some' if plural else 'a')
  if plural:
    fr_det = 'les' if definite else 'des'
  else:
    fr_det = ('le' if gender == 'm' else 'la') if definite else (
        'un' if gender == 'm' else 'une')
  en_noun = noun + 's' if plural and noun not in ('child', 'woman', 'man') \
      else noun
  en_noun = {'child': 'children', 'woman': 'women', 'man': 'men'}.get(
      noun, en_noun) if plural else en_noun
  fr_noun = fr_plural if plural else fr_noun
  if adjective is None:
    return f'{en_det} {en_noun}', f'{fr_det} {fr_noun}'
  masc, fem, before = _ADJECTIVES[adjective]
  fr_adj = fem if gender == 'f' else masc
  if plural and not fr_adj.endswith(('s', 'x')):
    fr_adj += 'x' if fr_adj.endswith('eau') else 's'
  fr = (f'{fr_det} {fr_adj} {fr_noun}' if before else
        f'{fr_det} {fr_noun} {fr_adj}')
  return f'{en_det} {adjective} {en_noun}', fr


def translate_example(rng: random.Random) -> dict[str, str]:
  """Subject verb object (preposition phrase) -> pseudo-French."""
  subject_plural = rng.random() < 0.4
  en_subj, fr_subj = _noun_phrase(rng, subject_plural)
  verb = rng.choice(sorted(_VERBS))
  en_verb = verb[1] if subject_plural else verb[0]
  fr_verb = _VERBS[verb][1 if subject_plural else 0]
  en_obj, fr_obj = _noun_phrase(rng, rng.random() < 0.4)
  en, fr = [en_subj, en_verb, en_obj], [fr_subj, fr_verb, fr_obj]
  if rng.random() < 0.4:
    prep = rng.choice(sorted(_PREPOSITIONS))
    en_pp, fr_pp = _noun_phrase(rng, rng.random() < 0.4)
    en += [prep, en_pp]
    fr += [_PREPOSITIONS[prep], fr_pp]
  return {'inputs': 'translate English to French: ' + _sentence(en),
          'targets': _sentence(fr)}


def qa_example(rng: random.Random) -> dict[str, str]:
  """Facts about different people, one relation each; ask one, copy its span.

  The relation word (lives / works / owns / likes) finds the fact, as a
  question's wording finds a SQuAD paragraph's sentence; the answer is the
  span after it (1 to 3 tokens).
  """
  relations = rng.sample(sorted(_RELATIONS), 3)
  people = rng.sample(_FIRST, 3)
  facts, answers = [], []
  for person, relation in zip(people, relations):
    template, answer = _RELATIONS[relation](rng)
    facts.append(f'{person} {template.format(answer)} .')
    answers.append(answer)
  asked = rng.randrange(3)
  question = _QUESTIONS[relations[asked]].format(people[asked])
  order = list(range(3))
  rng.shuffle(order)
  context = ' '.join(facts[i] for i in order)
  return {'inputs': f'question: {question} context: {context}',
          'targets': answers[asked]}


GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    'summarize': summarize_example,
    'translate': translate_example,
    'qa': qa_example,
}


def generate(task: str, split: str, index: int, seed: int = 0
             ) -> dict[str, str]:
  """Example `index` of `split` of `task`: {'inputs': ..., 'targets': ...}."""
  if task not in GENERATORS:
    raise ValueError(f'unknown synthetic task {task!r}; valid: '
                     f'{", ".join(GENERATORS)}')
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; valid: {", ".join(SPLITS)}')
  return GENERATORS[task](example_rng(task, split, index, seed))


def examples(task: str, split: str, start: int = 0, seed: int = 0
             ) -> Iterator[dict[str, str]]:
  """The examples of a split in order, from index `start`."""
  for index in range(start, SPLITS[split]):
    yield generate(task, split, index, seed)
