"""Hugging Face T5 1.1 checkpoints in and out of model dirs (no gin).

Import reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`, which needs torch:
`pip install -e .[hf]`) in the `T5ForConditionalGeneration` layout with
gated-GELU MLPs, maps every tensor onto this project's parameter tree
(shapes checked, transposes where the layouts differ) and writes a model
dir: orbax parameters at step 0, model.json, the vocabulary, and model.gin
holding the dims. A tensor missing, left over or of the wrong shape is a
one-line error naming it, and nothing is written. Export writes an untied,
unscaled T5 1.1 HF dir that transformers reloads.

The output head: T5 1.1 has an untied `lm_head`. A tied checkpoint (no
`lm_head.weight`, or transformers' `scale_decoder_outputs`) multiplies the
decoder output by d_model**-0.5 before the shared embedding; that scale is
folded into `decoder/logits_dense`.

Every file is read and written through `storage.files` (local or gs://,
whole or nothing).
"""

import dataclasses
import os
from typing import Any
from typing import Callable
from typing import Optional

import jax
import numpy as np
import safetensors
import safetensors.numpy

from calm_jax import errors
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.storage import checkpoints
from calm_jax.storage import files

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_BIN = 'pytorch_model.bin'
HF_VOCAB = 'spiece.model'
# Copies of `shared.weight` that older checkpoints store; accepted when equal.
EMBEDDING_ALIASES = (
  'encoder.embed_tokens.weight',
  'decoder.embed_tokens.weight',
)


class ConversionError(errors.UserError, ValueError):
  """A checkpoint that does not map onto the model (names the tensor)."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One HF tensor <-> one parameter, with the layout change both ways."""

  hf_name: str
  path: tuple[str, ...]  # into this project's params
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _transpose(x):
  return x.T


def _projection_in(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """q/k/v: HF [heads*head_dim, embed] <-> ours [embed, heads, head_dim]."""
  return (
    lambda w: w.T.reshape(w.shape[1], heads, head_dim),
    lambda w: w.reshape(w.shape[0], heads * head_dim).T,
  )


def _projection_out(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """o: HF [embed, heads*head_dim] <-> ours [heads, head_dim, embed]."""
  return (
    lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
    lambda w: w.reshape(heads * head_dim, w.shape[-1]).T,
  )


def _attention_maps(
  hf_prefix: str, path: tuple[str, ...], config: network.T5Config
) -> list[TensorMap]:
  into, out_of = _projection_in(config.num_heads, config.head_dim)
  maps = [
    TensorMap(f'{hf_prefix}.{hf}.weight', path + (ours,), into, out_of)
    for hf, ours in (('q', 'query'), ('k', 'key'), ('v', 'value'))
  ]
  into, out_of = _projection_out(config.num_heads, config.head_dim)
  return maps + [
    TensorMap(f'{hf_prefix}.o.weight', path + ('out',), into, out_of)
  ]


def _mlp_maps(hf_prefix: str, path: tuple[str, ...]) -> list[TensorMap]:
  return [
    TensorMap(
      f'{hf_prefix}.{name}.weight', path + (name,), _transpose, _transpose
    )
    for name in ('wi_0', 'wi_1', 'wo')
  ]


def _norm_map(hf_name: str, path: tuple[str, ...]) -> TensorMap:
  return TensorMap(hf_name, path + ('scale',), _same, _same)


def _stack_maps(stack: str) -> list[TensorMap]:
  """A stack's relative position bias (held by block 0 in HF, once per
  stack here) and its final norm."""
  return [
    TensorMap(
      f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
      (stack, 'relpos_bias', 'rel_embedding'),
      _transpose,
      _transpose,
    ),
    _norm_map(f'{stack}.final_layer_norm.weight', (stack, f'{stack}_norm')),
  ]


def _encoder_maps(config: network.T5Config) -> list[TensorMap]:
  maps = _stack_maps('encoder')
  for i in range(config.num_encoder_layers):
    hf, ours = f'encoder.block.{i}.layer', ('encoder', f'layers_{i}')
    maps += _attention_maps(
      f'{hf}.0.SelfAttention', ours + ('attention',), config
    )
    maps += [
      _norm_map(f'{hf}.0.layer_norm.weight', ours + ('pre_attention_norm',)),
      _norm_map(f'{hf}.1.layer_norm.weight', ours + ('pre_mlp_norm',)),
    ]
    maps += _mlp_maps(f'{hf}.1.DenseReluDense', ours + ('mlp',))
  return maps


def _decoder_maps(config: network.T5Config) -> list[TensorMap]:
  maps = _stack_maps('decoder')
  for i in range(config.num_decoder_layers):
    hf, ours = f'decoder.block.{i}.layer', ('decoder', f'layers_{i}')
    maps += _attention_maps(
      f'{hf}.0.SelfAttention', ours + ('self_attention',), config
    )
    maps += _attention_maps(
      f'{hf}.1.EncDecAttention', ours + ('encoder_decoder_attention',), config
    )
    maps += [
      _norm_map(
        f'{hf}.0.layer_norm.weight', ours + ('pre_self_attention_norm',)
      ),
      _norm_map(
        f'{hf}.1.layer_norm.weight', ours + ('pre_cross_attention_norm',)
      ),
      _norm_map(f'{hf}.2.layer_norm.weight', ours + ('pre_mlp_norm',)),
    ]
    maps += _mlp_maps(f'{hf}.2.DenseReluDense', ours + ('mlp',))
  return maps


def tensor_maps(config: network.T5Config) -> list[TensorMap]:
  """Every tensor of an untied HF T5 1.1 and where it goes."""
  return (
    [
      TensorMap('shared.weight', ('token_embedder', 'embedding'), _same, _same),
      TensorMap(
        'lm_head.weight', ('decoder', 'logits_dense'), _transpose, _transpose
      ),
    ]
    + _encoder_maps(config)
    + _decoder_maps(config)
  )


# --- configs ---------------------------------------------------------------

# The config.json fields the dims come from.
HF_DIMS = ('vocab_size', 'd_model', 'num_heads', 'd_kv', 'd_ff', 'num_layers')


def config_from_hf(hf: dict) -> tuple[network.T5Config, bool]:
  """(our config, whether the decoder output is scaled by d_model**-0.5)."""
  if not isinstance(hf, dict):
    raise ConversionError('config.json does not hold a JSON object')
  missing = [k for k in HF_DIMS if not isinstance(hf.get(k), int)]
  if missing:
    raise ConversionError(
      f'config.json lacks integer {", ".join(missing)}: not a T5 config'
    )
  if hf.get('feed_forward_proj') != 'gated-gelu':
    raise ConversionError(
      'only T5 1.1 checkpoints (feed_forward_proj="gated-gelu") map onto '
      f'this model; got feed_forward_proj={hf.get("feed_forward_proj")!r}'
    )
  config = network.T5Config(
    vocab_size=hf['vocab_size'],
    emb_dim=hf['d_model'],
    num_heads=hf['num_heads'],
    head_dim=hf['d_kv'],
    mlp_dim=hf['d_ff'],
    num_encoder_layers=hf['num_layers'],
    num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
    dropout_rate=float(hf.get('dropout_rate', 0.0)),
    relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
    relative_attention_max_distance=hf.get(
      'relative_attention_max_distance', 128
    ),
    layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
  )
  # transformers >= 5 saves the flag; before, tied embeddings meant scaling.
  scale = hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True))
  return config, bool(scale)


def hf_config(config: network.T5Config) -> dict:
  """config.json of an untied, unscaled T5 1.1 with these dims."""
  return {
    'architectures': ['T5ForConditionalGeneration'],
    'model_type': 't5',
    'vocab_size': config.vocab_size,
    'd_model': config.emb_dim,
    'd_kv': config.head_dim,
    'd_ff': config.mlp_dim,
    'num_layers': config.num_encoder_layers,
    'num_decoder_layers': config.num_decoder_layers,
    'num_heads': config.num_heads,
    'relative_attention_num_buckets': config.relative_attention_num_buckets,
    'relative_attention_max_distance': config.relative_attention_max_distance,
    'dropout_rate': config.dropout_rate,
    'layer_norm_epsilon': config.layer_norm_epsilon,
    'feed_forward_proj': 'gated-gelu',
    'is_encoder_decoder': True,
    'tie_word_embeddings': False,
    'scale_decoder_outputs': False,
    'pad_token_id': 0,
    'eos_token_id': 1,
    'decoder_start_token_id': 0,
  }


def model_gin(config: network.T5Config) -> str:
  """A gin/models-style file with the dims of `config`."""
  lines = [
    '# Dims of an imported T5 (written by calm_jax.convert).',
    'MODEL_CONFIG = @calm_jax.T5Config()',
  ]
  lines += [
    f'calm_jax.T5Config.{k} = {v!r}'
    for k, v in dataclasses.asdict(config).items()
  ]
  return '\n'.join(lines) + '\n'


# --- reading and writing tensors ------------------------------------------


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  # The flax framework reads bfloat16 too; parameters are kept in float32.
  with safetensors.safe_open(path, framework='flax') as f:
    return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
      f'{path} is a PyTorch file: install torch '
      '(pip install -e .[hf]) or convert it to '
      'safetensors'
    ) from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def _root(path: str) -> str:
  """The checkpoint dir of a dir or of a weights file in it."""
  return path if files.is_dir(path) else os.fspath(files.as_path(path).parent)


def _weight_files(path: str) -> list[str]:
  if not files.is_dir(path):
    return [path]
  index_path = files.join(path, SAFETENSORS_INDEX)
  if files.exists(index_path):
    index = files.read_json(
      index_path,
      what='safetensors index',
      recovery='download the checkpoint again',
    )
    return sorted(
      {files.join(path, name) for name in index.get('weight_map', {}).values()}
    )
  return [
    files.join(path, n)
    for n in (SAFETENSORS, TORCH_BIN)
    if files.exists(files.join(path, n))
  ][:1]


def read_hf_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, tensors) of a checkpoint dir or of a weights file."""
  if not files.exists(path):
    raise ConversionError(f'no Hugging Face checkpoint at {path}')
  config_path = files.join(_root(path), 'config.json')
  if not files.exists(config_path):
    raise ConversionError(f'no config.json next to {path}')
  config = files.read_json(
    config_path, what='HF config', recovery='download the checkpoint again'
  )
  weights = _weight_files(path)
  if not weights:
    raise ConversionError(
      f'no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN} in {path}'
    )
  tensors = {}
  for file in weights:
    read = _read_torch_bin if file.endswith('.bin') else _read_safetensors
    try:
      tensors.update(read(files.local_copy(file)))
    except (ConversionError, FileNotFoundError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A truncated or corrupt file: safetensors and torch raise their own
      # error types for it.
      raise ConversionError(
        f'cannot read the weights file {file} '
        f'({errors.first_line(e)}): download it again'
      ) from e
  return config, tensors


# --- the mapping -----------------------------------------------------------


def _expected_shapes(config: network.T5Config) -> dict[tuple[str, ...], tuple]:
  shapes = jax.eval_shape(
    lambda: models.CalmModel(config).init_params(jax.random.PRNGKey(0))[
      'params'
    ]
  )
  return {
    tuple(k.key for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
  }


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _untie(
  tensors: dict[str, np.ndarray], scale: bool, emb_dim: int
) -> dict[str, np.ndarray]:
  """Tensors of the untied, unscaled layout: aliases of the shared
  embedding checked and dropped, the head made explicit and scaled."""
  tensors = dict(tensors)
  for alias in EMBEDDING_ALIASES:
    if alias in tensors:
      if not np.array_equal(tensors.pop(alias), tensors.get('shared.weight')):
        raise ConversionError(
          f'{alias} differs from shared.weight; T5 ties them'
        )
  if 'lm_head.weight' not in tensors and 'shared.weight' in tensors:
    tensors['lm_head.weight'] = tensors['shared.weight']
  if scale and 'lm_head.weight' in tensors:
    tensors['lm_head.weight'] = tensors['lm_head.weight'] * emb_dim**-0.5
  return tensors


def hf_to_params(
  tensors: dict[str, np.ndarray],
  config: network.T5Config,
  scale_head: bool = False,
) -> dict:
  """This project's parameter tree from HF tensors (all checked)."""
  tensors = _untie(tensors, scale_head, config.emb_dim)
  expected = _expected_shapes(config)
  params = {}
  for m in tensor_maps(config):
    if m.hf_name not in tensors:
      raise ConversionError(f'missing tensor {m.hf_name}')
    value = np.asarray(tensors.pop(m.hf_name), np.float32)
    want = expected.pop(m.path)
    converted = m.to_ours(value) if value.size == np.prod(want) else None
    if converted is None or converted.shape != want:
      hf_shape = m.to_hf(np.zeros(want, np.float32)).shape
      raise ConversionError(
        f'tensor {m.hf_name} has shape {value.shape}; a T5 1.1 of these '
        f'dims holds {hf_shape} there (for {"/".join(m.path)})'
      )
    _set(params, m.path, converted)
  if tensors:
    raise ConversionError(
      f'unexpected tensor {sorted(tensors)[0]} ({len(tensors)} left unmapped)'
    )
  if expected:
    raise ConversionError(
      'parameters without an HF tensor: '
      + ', '.join('/'.join(p) for p in expected)
    )
  return params


def params_to_hf(
  params: Any, config: network.T5Config
) -> dict[str, np.ndarray]:
  """HF tensors (untied, unscaled T5 1.1 layout) from our parameters."""
  return {
    m.hf_name: np.ascontiguousarray(
      m.to_hf(np.asarray(_get(params, m.path), np.float32))
    )
    for m in tensor_maps(config)
  }


# --- whole checkpoints -----------------------------------------------------


def _vocab_for(path: str, vocab: Optional[str]) -> str:
  vocab = vocab or files.join(_root(path), HF_VOCAB)
  if not files.exists(vocab):
    raise ConversionError(
      f"no vocabulary at {vocab}: pass the checkpoint's SentencePiece "
      'model with `--gin.VOCAB="\'PATH\'"`'
    )
  return vocab


def import_hf(
  path: str, model_dir: str, vocab: Optional[str] = None, dtype: str = 'float32'
) -> network.T5Config:
  """Writes a new model dir from an HF checkpoint; returns its config.

  Every tensor is checked before anything is written, and the model dir
  appears whole or not at all. Parameters are stored in float32 whatever
  the checkpoint holds; `dtype` is the activation dtype the model dir runs
  with ('bfloat16' as t5x does on TPU/GPU).
  """
  if files.exists(model_dir):
    raise ConversionError(f'{model_dir} exists; choose a new directory')
  hf, tensors = read_hf_checkpoint(path)
  vocab = _vocab_for(path, vocab)
  config, scale = config_from_hf(hf)
  config = dataclasses.replace(config, dtype=dtype)
  params = hf_to_params(tensors, config, scale)  # every check before writing

  def fill(staging: str) -> None:
    mgr = checkpoints.manager(staging)
    mgr.save(0, args=checkpoints.params_only_save_args(params))
    mgr.wait_until_finished()
    mgr.close()
    model_files.write_model_files(staging, config, vocab)
    files.atomic_write_text(files.join(staging, 'model.gin'), model_gin(config))

  files.new_directory(model_dir, fill, what='model dir')
  return config


def export_hf(model_dir: str, out_dir: str, step: Optional[int] = None) -> None:
  """Writes a new HF dir: config.json, model.safetensors, spiece.model."""
  if files.exists(out_dir):
    raise ConversionError(f'{out_dir} exists; choose a new directory')
  config, vocab = model_files.read_model_config(model_dir)
  params, _ = model_files.load_params(model_dir, config, step)
  tensors = params_to_hf(jax.device_get(params), config)

  def fill(staging: str) -> None:
    files.atomic_write(
      files.join(staging, SAFETENSORS),
      lambda tmp: safetensors.numpy.save_file(tensors, tmp),
    )
    files.atomic_write_json(
      files.join(staging, 'config.json'), hf_config(config)
    )
    files.copy_file(vocab, files.join(staging, HF_VOCAB))

  files.new_directory(out_dir, fill, what='HF dir')
