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
from typing import Any
from typing import Optional

import jax
import numpy as np

from calm_jax.model import hf_tensors
from calm_jax.model import layout
from calm_jax.model import model_files
from calm_jax.model import models
from calm_jax.model import network
from calm_jax.storage import files

HF_VOCAB = 'spiece.model'
# Copies of `shared.weight` that older checkpoints store; accepted when equal.
EMBEDDING_ALIASES = (
  'encoder.embed_tokens.weight',
  'decoder.embed_tokens.weight',
)


def _attention_maps(
  hf_prefix: str, path: tuple[str, ...], config: network.T5Config
) -> list[hf_tensors.TensorMap]:
  into, out_of = hf_tensors.projection_in(config.num_heads, config.head_dim)
  maps = [
    hf_tensors.TensorMap(
      f'{hf_prefix}.{hf}.weight', path + (ours,), into, out_of
    )
    for hf, ours in (('q', 'query'), ('k', 'key'), ('v', 'value'))
  ]
  into, out_of = hf_tensors.projection_out(config.num_heads, config.head_dim)
  return maps + [
    hf_tensors.TensorMap(f'{hf_prefix}.o.weight', path + ('out',), into, out_of)
  ]


def _mlp_maps(
  hf_prefix: str, path: tuple[str, ...]
) -> list[hf_tensors.TensorMap]:
  return [
    hf_tensors.TensorMap(
      f'{hf_prefix}.{name}.weight',
      path + (name,),
      hf_tensors.transpose,
      hf_tensors.transpose,
    )
    for name in ('wi_0', 'wi_1', 'wo')
  ]


def _norm_map(hf_name: str, path: tuple[str, ...]) -> hf_tensors.TensorMap:
  return hf_tensors.TensorMap(
    hf_name, path + ('scale',), hf_tensors.same, hf_tensors.same
  )


def _stack_maps(stack: str) -> list[hf_tensors.TensorMap]:
  """A stack's relative position bias (held by block 0 in HF, once per
  stack here) and its final norm."""
  return [
    hf_tensors.TensorMap(
      f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
      (stack, 'relpos_bias', 'rel_embedding'),
      hf_tensors.transpose,
      hf_tensors.transpose,
    ),
    _norm_map(f'{stack}.final_layer_norm.weight', (stack, f'{stack}_norm')),
  ]


def _encoder_maps(config: network.T5Config) -> list[hf_tensors.TensorMap]:
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


def _decoder_maps(config: network.T5Config) -> list[hf_tensors.TensorMap]:
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


def tensor_maps(config: network.T5Config) -> list[hf_tensors.TensorMap]:
  """Every tensor of an untied HF T5 1.1 and where it goes."""
  return (
    [
      hf_tensors.TensorMap(
        'shared.weight',
        ('token_embedder', 'embedding'),
        hf_tensors.same,
        hf_tensors.same,
      ),
      hf_tensors.TensorMap(
        'lm_head.weight',
        ('decoder', 'logits_dense'),
        hf_tensors.transpose,
        hf_tensors.transpose,
      ),
    ]
    + _encoder_maps(config)
    + _decoder_maps(config)
  )


# --- configs ---------------------------------------------------------------

# config.json model types whose checkpoints map onto this model.
MODEL_TYPES = ('t5',)
# The config.json fields the dims come from.
HF_DIMS = ('vocab_size', 'd_model', 'num_heads', 'd_kv', 'd_ff', 'num_layers')


def config_from_hf(hf: dict) -> tuple[network.T5Config, bool]:
  """(our config, whether the decoder output is scaled by d_model**-0.5)."""
  if not isinstance(hf, dict):
    raise hf_tensors.ConversionError('config.json does not hold a JSON object')
  missing = [k for k in HF_DIMS if not isinstance(hf.get(k), int)]
  if missing:
    raise hf_tensors.ConversionError(
      f'config.json lacks integer {", ".join(missing)}: not a T5 config'
    )
  if hf.get('feed_forward_proj') != 'gated-gelu':
    raise hf_tensors.ConversionError(
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
    for k, v in layout.without_layout(config).items()
  ]
  return '\n'.join(lines) + '\n'


# --- the mapping -----------------------------------------------------------


def _untie(
  tensors: dict[str, np.ndarray], scale: bool, emb_dim: int
) -> dict[str, np.ndarray]:
  """Tensors of the untied, unscaled layout: aliases of the shared
  embedding checked and dropped, the head made explicit and scaled."""
  tensors = dict(tensors)
  for alias in EMBEDDING_ALIASES:
    if alias in tensors:
      if not np.array_equal(tensors.pop(alias), tensors.get('shared.weight')):
        raise hf_tensors.ConversionError(
          f'{alias} differs from shared.weight; T5 ties them'
        )
  if 'lm_head.weight' not in tensors and 'shared.weight' in tensors:
    tensors['lm_head.weight'] = tensors['shared.weight']
  if scale and 'lm_head.weight' in tensors:
    tensors['lm_head.weight'] = tensors['lm_head.weight'] * emb_dim**-0.5
  return tensors


def _expected_shapes(config: network.T5Config) -> dict[tuple[str, ...], tuple]:
  return hf_tensors.shapes_of(
    jax.eval_shape(
      lambda: models.CalmModel(config).init_params(jax.random.PRNGKey(0))
    )['params']
  )


def hf_to_params(
  tensors: dict[str, np.ndarray],
  config: network.T5Config,
  scale_head: bool = False,
) -> dict:
  """This project's parameter tree from HF tensors (all checked)."""
  return hf_tensors.to_params(
    _untie(tensors, scale_head, config.emb_dim),
    tensor_maps(config),
    _expected_shapes(config),
    'a T5 1.1 of these dims',
  )


def params_to_hf(
  params: Any, config: network.T5Config
) -> dict[str, np.ndarray]:
  """HF tensors (untied, unscaled T5 1.1 layout) from our parameters."""
  return hf_tensors.to_tensors(params, tensor_maps(config))


# --- whole checkpoints -----------------------------------------------------


def _vocab_for(path: str, vocab: Optional[str]) -> str:
  vocab = vocab or files.join(hf_tensors.checkpoint_root(path), HF_VOCAB)
  if not files.exists(vocab):
    raise hf_tensors.ConversionError(
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
    raise hf_tensors.ConversionError(
      f'{model_dir} exists; choose a new directory'
    )
  hf, tensors = hf_tensors.read_hf_checkpoint(path)
  vocab = _vocab_for(path, vocab)
  config, scale = config_from_hf(hf)
  config = dataclasses.replace(config, dtype=dtype)
  params = hf_to_params(tensors, config, scale)  # every check before writing

  def fill(staging: str) -> None:
    hf_tensors.save_params(staging, params)
    model_files.write_model_files(staging, config, vocab)
    files.atomic_write_text(files.join(staging, 'model.gin'), model_gin(config))

  files.new_directory(model_dir, fill, what='model dir')
  return config


def export_hf(model_dir: str, out_dir: str, step: Optional[int] = None) -> None:
  """Writes a new HF dir: config.json, model.safetensors, spiece.model."""
  config, vocab = model_files.read_model_config(model_dir)
  # HF's layout is one tensor per layer: a scanned dir's stacks are split.
  config = dataclasses.replace(config, scan_layers=False)
  params, _ = model_files.load_params(model_dir, config, step)
  hf_tensors.write_hf_dir(
    out_dir,
    params_to_hf(jax.device_get(params), config),
    hf_config(config),
    {HF_VOCAB: vocab},
  )
