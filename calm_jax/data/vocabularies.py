"""The tokenizers a model dir holds, behind one interface (no TensorFlow).

- `SentencePieceVocabulary`: a SentencePiece model file (T5's), with T5's
  sentinel ids past its pieces;
- `TokenizerVocabulary`: a Hugging Face `tokenizer.json` (the Llama family,
  read with the `tokenizers` library), with the chat template of its
  `tokenizer_config.json` when it has one.

`load(path)` picks the class from the file. Every text is checked to be
valid Unicode before it reaches a tokenizer.
"""

import os
from typing import Optional
from typing import Protocol
from typing import Sequence

import sentencepiece as spm

from calm_jax import arguments
from calm_jax import errors
from calm_jax.storage import files
from calm_jax.storage import provenance


class Vocabulary(Protocol):
  """What decoding and scoring need of a tokenizer."""

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens added."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of token ids (special tokens and pads dropped)."""

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """Each id's own piece, for exit maps and the JSONL's `tokens`."""

  @property
  def eos_id(self) -> int:
    """The id that ends an output."""

  def input_ids(self, text: str, limit: int) -> tuple[list[int], bool]:
    """The model's input for `text`, at most `limit` ids, and whether it
    had to be cut to fit."""

  def fingerprint(self) -> object:
    """Everything of the tokenizer's files that changes a text's ids or an
    output's text (a JSON value), for the model's fingerprint."""


class VocabularyError(errors.UserError, ValueError):
  """A vocabulary file that is missing or not a SentencePiece model."""


class SentencePieceVocabulary:
  """A SentencePiece model file as a Vocabulary, with encode (ids past the
  model's pieces are T5's sentinels, <extra_id_N>)."""

  def __init__(self, path: str):
    self.path = path
    try:
      self.processor = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:  # SentencePiece's error for both
      raise VocabularyError(
        f'vocabulary {path} is missing or not a SentencePiece model '
        f'({errors.first_line(e)}): restore it from the training run that '
        'made the model dir'
      ) from e

  eos_id = 1  # T5's: pad 0, EOS 1

  def fingerprint(self) -> str:
    return provenance.digest_file(self.path)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (valid Unicode: see `arguments.unicode_text`)."""
    return list(self.processor.encode(arguments.unicode_text('text', text)))

  def input_ids(self, text: str, limit: int) -> tuple[list[int], bool]:
    """T5's encoder input: the text's ids cut to `limit - 1`, then EOS."""
    ids = self.encode(text)
    return ids[: limit - 1] + [self.eos_id], len(ids) > limit - 1

  def decode(self, ids: Sequence[int]) -> str:
    size = self.processor.GetPieceSize()
    return self.processor.decode([int(i) for i in ids if 0 <= int(i) < size])

  def pieces(self, ids: Sequence[int]) -> list[str]:
    size = self.processor.GetPieceSize()
    return [
      self.processor.id_to_piece(int(i))
      if int(i) < size
      else f'<extra_id_{int(i) - size}>'
      for i in ids
    ]


class TokenizerVocabulary:
  """A Hugging Face tokenizer.json, and the chat template beside it."""

  def __init__(self, path: str, chat: bool = True):
    """`chat`: wrap each input in the chat template as the user's turn
    (when the tokenizer has one; instruct models expect it)."""
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.path = path
    try:
      self.tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      # tokenizers raises its own Exception subclass for a bad file.
      raise VocabularyError(
        f'tokenizer {path} is missing or not a tokenizer.json '
        f'({errors.first_line(e)}): restore it from the checkpoint it was '
        'imported from'
      ) from e
    self.config = _tokenizer_config(path)
    self.chat = chat and bool(self.chat_template)
    eos = self.tokenizer.token_to_id(_special(self.config, 'eos_token'))
    self.eos_id = 2 if eos is None else eos  # Llama's default

  def encode(self, text: str) -> list[int]:
    text = arguments.unicode_text('text', text)
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def input_ids(self, text: str, limit: int) -> tuple[list[int], bool]:
    """The prompt (in the chat template when `chat`); a prompt longer than
    `limit` keeps its end, where the generation prompt is."""
    ids = self.encode(self.chat_prompt(text) if self.chat else text)
    return ids[-limit:], len(ids) > limit

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(
      [int(i) for i in ids], skip_special_tokens=True
    )

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self.tokenizer.id_to_token(int(i)) or '' for i in ids]

  @property
  def chat_template(self) -> Optional[str]:
    return self.config.get('chat_template')

  def fingerprint(self) -> dict:
    """The tokenizer file's digest, the chat template every input is wrapped
    in (None: inputs go in bare) and the special tokens the template and EOS
    are read from: each a key of its own, so a refusal names what changed."""
    return {
      'tokenizer': provenance.digest_file(self.path),
      'chat_template': (
        provenance.short_hash(self.chat_template) if self.chat else None
      ),
      'bos_token': _special(self.config, 'bos_token'),
      'eos_token': _special(self.config, 'eos_token'),
    }

  def chat_prompt(self, text: str, system: Optional[str] = None) -> str:
    """`text` as the user's turn of a chat, with the generation prompt, in
    the tokenizer's own template (as transformers' apply_chat_template
    renders it)."""
    if not self.chat_template:
      raise VocabularyError(
        f'{self.path} has no chat template (tokenizer_config.json)'
      )
    messages = [{'role': 'system', 'content': system}] if system else []
    messages.append({'role': 'user', 'content': text})
    return _render_chat(self.chat_template, messages, self.config)


def _tokenizer_config(path: str) -> dict:
  """tokenizer_config.json beside the tokenizer, with the chat template of
  chat_template.jinja when the template is kept in a file of its own. A
  corrupt or unreadable one is one line naming it."""
  folder = os.path.dirname(path)
  recovery = 'restore it from the checkpoint the model was imported from'
  config = {}
  config_path = os.path.join(folder, 'tokenizer_config.json')
  if os.path.exists(config_path):
    config = files.read_json(config_path, 'tokenizer config', recovery)
    if not isinstance(config, dict):
      raise VocabularyError(
        f'tokenizer config {config_path} is not a JSON object: {recovery}'
      )
  template_path = os.path.join(folder, 'chat_template.jinja')
  if os.path.exists(template_path):
    config['chat_template'] = files.read_text(
      template_path, 'chat template', recovery
    )
  return config


def _special(config: dict, name: str) -> str:
  token = config.get(name)
  return token.get('content', '') if isinstance(token, dict) else token or ''


def _render_chat(template: str, messages: list[dict], config: dict) -> str:
  """A chat template rendered as transformers does: a sandboxed Jinja
  environment that trims blocks, with its `raise_exception` helper."""
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise VocabularyError(f'chat template: {message}')

  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True
  )
  env.globals['raise_exception'] = raise_exception
  return env.from_string(template).render(
    messages=messages,
    add_generation_prompt=True,
    bos_token=_special(config, 'bos_token'),
    eos_token=_special(config, 'eos_token'),
  )


def load(path: str) -> Vocabulary:
  """The vocabulary in a model dir's file: tokenizer.json or SentencePiece."""
  if path.endswith('.json'):
    return TokenizerVocabulary(path)
  return SentencePieceVocabulary(path)
