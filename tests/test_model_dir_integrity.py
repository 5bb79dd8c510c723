"""Every file a model dir holds is checked before it is used: one flipped
bit in any of them is refused in one line naming it, for trained and for
converted dirs, parameters, classifier, adapters and JSON alike."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax.inference import loaded as loaded_lib
from calm_jax.model import adapters
from calm_jax.model import hf_llama
from calm_jax.model import llama
from calm_jax.model import model_files
from calm_jax.storage import checkpoints
from calm_jax.storage import provenance

TINY_LLAMA = llama.LlamaConfig(
  vocab_size=96,
  emb_dim=32,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=48,
)


def _flip_one_bit(path: pathlib.Path, where: float = 0.5) -> None:
  data = bytearray(path.read_bytes())
  data[int(len(data) * where)] ^= 0x08
  path.write_bytes(bytes(data))


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest data file of a step's parameters: the OCDBT database's
  params/d/ (a decode reads no optimizer state, and orbax reads none of
  the per-process files it merged)."""
  return max(
    (step_dir / 'params' / 'd').iterdir(),
    key=lambda p: p.stat().st_size,
  )


@pytest.fixture(scope='module')
def converted_dir(tmp_path_factory):
  """A Llama-family dir as `calm_jax.convert` writes one (random weights,
  a word-level tokenizer), with exit adapters."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('converted')
  vocab = {f'w{i}': i for i in range(TINY_LLAMA.vocab_size)}
  tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='w0')).save(
    str(root / 'tokenizer.json')
  )
  params = llama.CalmLlama(TINY_LLAMA).init_params(jax.random.PRNGKey(0))
  model_dir = root / 'model'
  hf_llama.write_model_dir(
    str(model_dir),
    TINY_LLAMA,
    jax.device_get(params['params']),
    {'tokenizer.json': str(root / 'tokenizer.json')},
    source={'path': 'random'},
  )
  hidden = np.random.default_rng(0).normal(size=(2, 64, 32))
  adapters.save(str(model_dir), adapters.fit(hidden), {'fitted_on': 'noise'})
  return model_dir


def _copy(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  target = tmp_path / 'model'
  shutil.copytree(source, target)
  return target


def test_an_untouched_dir_loads_and_is_sealed(converted_dir, tiny_model_dir):
  for model_dir in (converted_dir, pathlib.Path(tiny_model_dir)):
    meta = json.loads((model_dir / 'model.json').read_text())
    assert provenance.seal_intact(meta) and provenance.DIGEST in meta
    assert f'vocab/{meta["vocabulary"]}' in meta['files']
    assert (model_dir / 'checkpoints.manifests').is_dir()
  model = loaded_lib.load(str(converted_dir))
  assert llama.ADAPTERS in model.params and model.step == 0
  assert (converted_dir / 'adapters.manifests' / '1.json').is_file()


# (file in the dir, what the one-line refusal names)
CONVERTED_FILES = {
  'params': ('checkpoints/0', r'checkpoints( holds no usable|.*step 0)'),
  'params manifest': ('checkpoints.manifests/0.json', r'checkpoints.*step 0'),
  'adapters': ('adapters/1', r'adapters.*step 1'),
  'adapters.json': ('adapters.json', r'adapters.json was changed'),
  'model.json': ('model.json', r'model.json (was changed|is not valid|holds)'),
  'tokenizer': ('vocab/tokenizer.json', r'tokenizer.json was changed'),
}


def _refused_after_one_flipped_bit(model_dir, name: str, message: str):
  [path] = model_dir.glob(name)
  _flip_one_bit(_array_file(path) if path.is_dir() else path)
  with pytest.raises(checkpoints.CheckpointError, match=message) as raised:
    loaded_lib.load(str(model_dir))
  assert '\n' not in str(raised.value)


@pytest.mark.parametrize('kind', sorted(CONVERTED_FILES))
def test_one_flipped_bit_in_a_converted_dir_is_refused(
  converted_dir, tmp_path, kind
):
  _refused_after_one_flipped_bit(
    _copy(converted_dir, tmp_path), *CONVERTED_FILES[kind]
  )


TRAINED_FILES = {
  'classifier': ('classifier/2', r'classifier.*step 2'),
  'config.gin': ('config.gin', r'config.gin was changed'),
  'spiece': ('vocab/*', r'vocab/.* was changed'),
}


@pytest.mark.parametrize('kind', sorted(TRAINED_FILES))
def test_one_flipped_bit_in_a_trained_dir_is_refused(
  tiny_model_dir, tmp_path, kind
):
  _refused_after_one_flipped_bit(
    _copy(pathlib.Path(tiny_model_dir), tmp_path), *TRAINED_FILES[kind]
  )


def test_a_dir_written_before_seals_is_read_as_it_is(converted_dir, tmp_path):
  model_dir = _copy(converted_dir, tmp_path)
  meta = json.loads((model_dir / 'model.json').read_text())
  del meta['digest'], meta['files']
  (model_dir / 'model.json').write_text(json.dumps(meta))
  config, _ = model_files.read_model_config(str(model_dir))
  assert config == TINY_LLAMA


def test_a_damaged_step_is_refused_without_reader_tracebacks(
  converted_dir, tmp_path
):
  """tensorstore's callbacks on orbax's closed event loop printed hundreds
  of tracebacks under the refusal; the job prints only its own lines."""
  model_dir = _copy(converted_dir, tmp_path)
  _flip_one_bit(_array_file(model_dir / 'checkpoints' / '0'))
  code = (
    'import sys\n'
    'from calm_jax import errors\n'
    'from calm_jax.inference import loaded\n'
    'try:\n'
    f'  loaded.load({str(model_dir)!r})\n'
    'except errors.UserError as e:\n'
    '  sys.exit(f"error: {errors.first_line(e)}")\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr, result.stderr[:2000]
  assert result.stderr.splitlines()[-1].startswith(
    'error: no usable checkpoint'
  )
