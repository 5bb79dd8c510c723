"""Hugging Face Llama-family checkpoints in and out of model dirs (no gin).

Import reads `config.json` and the weights (safetensors, sharded, or
`pytorch_model.bin`) of a `LlamaForCausalLM` with SiLU SwiGLU MLPs and
rotary positions (plain, linear-scaled or Llama 3.1-scaled; any other field
that changes the computation is refused by name), maps every tensor onto
`llama_network.DecoderOnly`'s parameters (shapes checked) and writes a model dir whole or not at all: orbax
parameters at step 0, model.json (family 'llama'), and the tokenizer files
(tokenizer.json, tokenizer_config.json with its chat template) under vocab/.
Export writes a Hugging Face dir that transformers loads.
"""

import dataclasses
from typing import Any
from typing import Optional

import jax
import numpy as np

from calm_jax.model import hf_tensors
from calm_jax.model import llama
from calm_jax.model import model_files
from calm_jax.storage import files

# The tokenizer, its settings, and its chat template (transformers 5 keeps
# the template in a file of its own; older ones in tokenizer_config.json).
TOKENIZER_FILES = (
  'tokenizer.json',
  'tokenizer_config.json',
  'chat_template.jinja',
)
HF_DIMS = (
  'vocab_size',
  'hidden_size',
  'num_hidden_layers',
  'num_attention_heads',
  'intermediate_size',
)


# config.json model types whose checkpoints map onto `llama_network.DecoderOnly`.
MODEL_TYPES = ('llama', 'mistral')


def _number(scaling: dict, key: str, kind: str) -> float:
  value = scaling.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise hf_tensors.ConversionError(
      f'rope_scaling {kind!r} lacks a number {key!r} (got {value!r})'
    )
  return value


def _rope_fields(hf: dict) -> dict:
  """Our rotary fields of a config.json: transformers 5 keeps them in
  `rope_parameters`, 4 in `rope_theta` and `rope_scaling` (whose older
  form names the kind 'type'). A scaling this model cannot apply is
  refused by name."""
  parameters = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or parameters
  if not isinstance(scaling, dict) or not isinstance(parameters, dict):
    raise hf_tensors.ConversionError('rope_scaling is not a JSON object')
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  context = hf.get('max_position_embeddings', 8192)
  fields = {
    'rope_theta': float(
      parameters.get('rope_theta', hf.get('rope_theta', 10000.0))
    ),
    'context_length': int(context),
  }
  if kind == 'default':
    return fields
  if kind not in ('linear', 'llama3'):
    raise hf_tensors.ConversionError(
      f'rope_scaling type {kind!r} is not supported: linear and llama3 '
      'scalings (and plain rotary positions) map onto this model'
    )
  fields.update(rope_scaling=kind, rope_factor=_number(scaling, 'factor', kind))
  if kind == 'llama3':
    fields.update(
      rope_low_freq_factor=_number(scaling, 'low_freq_factor', kind),
      rope_high_freq_factor=_number(scaling, 'high_freq_factor', kind),
      rope_original_context=int(
        scaling.get(
          'original_max_position_embeddings',
          hf.get('original_max_position_embeddings', context),
        )
      ),
    )
    if fields['rope_high_freq_factor'] <= fields['rope_low_freq_factor']:
      raise hf_tensors.ConversionError(
        'rope_scaling llama3 needs high_freq_factor > low_freq_factor'
      )
  if fields['rope_factor'] <= 0:
    raise hf_tensors.ConversionError('rope_scaling factor must be positive')
  return fields


def _refuse_what_does_not_map(hf: dict) -> None:
  """Every config.json field that changes the computation and that this
  model does not implement, refused by name."""
  kind = hf.get('model_type')
  if kind is not None and kind not in MODEL_TYPES:
    raise hf_tensors.ConversionError(
      f'model_type {kind!r} is not a Llama-family model this imports '
      f'({", ".join(MODEL_TYPES)})'
    )
  refused = {
    'hidden_act': hf.get('hidden_act', 'silu') != 'silu',
    'attention_bias': bool(hf.get('attention_bias')),
    'mlp_bias': bool(hf.get('mlp_bias')),
    # Mistral's windowed attention: each token sees the last N only.
    'sliding_window': hf.get('sliding_window') is not None
    and hf.get('use_sliding_window', True) is not False,
    'partial_rotary_factor': hf.get('partial_rotary_factor', 1.0) != 1.0,
  }
  for field, unsupported in refused.items():
    if unsupported:
      raise hf_tensors.ConversionError(
        f'config.json {field}={hf.get(field)!r} is not supported: this '
        'model has SiLU MLPs, no biases, full causal attention and rotary '
        'positions on the whole head'
      )


def config_from_hf(hf: dict) -> llama.LlamaConfig:
  """Our config of a Llama-family config.json (refused when it is not one)."""
  if not isinstance(hf, dict):
    raise hf_tensors.ConversionError('config.json does not hold a JSON object')
  missing = [k for k in HF_DIMS if not isinstance(hf.get(k), int)]
  if missing:
    raise hf_tensors.ConversionError(
      f'config.json lacks integer {", ".join(missing)}: not a Llama config'
    )
  _refuse_what_does_not_map(hf)
  heads = hf['num_attention_heads']
  return llama.LlamaConfig(
    vocab_size=hf['vocab_size'],
    emb_dim=hf['hidden_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=heads,
    num_kv_heads=hf.get('num_key_value_heads') or heads,
    head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
    mlp_dim=hf['intermediate_size'],
    rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    **_rope_fields(hf),
  )


def _rope_scaling_json(config: llama.LlamaConfig) -> Optional[dict]:
  """transformers' rope_scaling of our config (None: plain rotary)."""
  if config.rope_scaling == 'none':
    return None
  scaling = {'rope_type': config.rope_scaling, 'factor': config.rope_factor}
  if config.rope_scaling == 'llama3':
    scaling.update(
      low_freq_factor=config.rope_low_freq_factor,
      high_freq_factor=config.rope_high_freq_factor,
      original_max_position_embeddings=config.rope_original_context,
    )
  return scaling


def hf_config(config: llama.LlamaConfig, **special_tokens) -> dict:
  """config.json of a LlamaForCausalLM with these dims."""
  return {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'vocab_size': config.vocab_size,
    'hidden_size': config.emb_dim,
    'num_hidden_layers': config.num_layers,
    'num_attention_heads': config.num_heads,
    'num_key_value_heads': config.num_kv_heads,
    'head_dim': config.head_dim,
    'intermediate_size': config.mlp_dim,
    'hidden_act': 'silu',
    'rms_norm_eps': config.rms_norm_eps,
    'rope_theta': config.rope_theta,
    'rope_scaling': _rope_scaling_json(config),
    'max_position_embeddings': config.context_length,
    'tie_word_embeddings': config.tie_embeddings,
    'attention_bias': False,
    'mlp_bias': False,
    **special_tokens,
  }


def tensor_maps(config: llama.LlamaConfig) -> list[hf_tensors.TensorMap]:
  """Every tensor of a LlamaForCausalLM and where it goes."""
  same, transpose = hf_tensors.same, hf_tensors.transpose
  maps = [
    hf_tensors.TensorMap(
      'model.embed_tokens.weight', ('embedding',), same, same
    ),
    hf_tensors.TensorMap(
      'model.norm.weight', ('final_norm', 'scale'), same, same
    ),
  ]
  if not config.tie_embeddings:
    maps.append(
      hf_tensors.TensorMap(
        'lm_head.weight', ('logits_dense',), transpose, transpose
      )
    )
  for i in range(config.num_layers):
    hf, ours = f'model.layers.{i}', (f'layers_{i}',)
    heads = {
      'q': config.num_heads,
      'k': config.num_kv_heads,
      'v': config.num_kv_heads,
    }
    for name, path in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      into, out_of = hf_tensors.projection_in(heads[name], config.head_dim)
      maps.append(
        hf_tensors.TensorMap(
          f'{hf}.self_attn.{name}_proj.weight',
          ours + ('attention', path),
          into,
          out_of,
        )
      )
    into, out_of = hf_tensors.projection_out(config.num_heads, config.head_dim)
    maps.append(
      hf_tensors.TensorMap(
        f'{hf}.self_attn.o_proj.weight',
        ours + ('attention', 'out'),
        into,
        out_of,
      )
    )
    maps += [
      hf_tensors.TensorMap(
        f'{hf}.mlp.{name}_proj.weight',
        ours + ('mlp', name),
        transpose,
        transpose,
      )
      for name in ('gate', 'up', 'down')
    ]
    maps += [
      hf_tensors.TensorMap(
        f'{hf}.input_layernorm.weight',
        ours + ('attention_norm', 'scale'),
        same,
        same,
      ),
      hf_tensors.TensorMap(
        f'{hf}.post_attention_layernorm.weight',
        ours + ('mlp_norm', 'scale'),
        same,
        same,
      ),
    ]
  return maps


def _expected_shapes(config: llama.LlamaConfig) -> dict:
  return hf_tensors.shapes_of(
    jax.eval_shape(
      lambda: llama.CalmLlama(config).init_params(jax.random.PRNGKey(0))
    )['params']
  )


def hf_to_params(
  tensors: dict[str, np.ndarray], config: llama.LlamaConfig
) -> dict:
  """Our parameter tree from HF tensors (all checked). A tied checkpoint
  may store `lm_head.weight`: it must equal the embedding."""
  tensors = dict(tensors)
  head = tensors.get('lm_head.weight')
  if config.tie_embeddings and head is not None:
    if not np.array_equal(
      tensors.pop('lm_head.weight'), tensors.get('model.embed_tokens.weight')
    ):
      raise hf_tensors.ConversionError(
        'lm_head.weight differs from model.embed_tokens.weight in a tied model'
      )
  return hf_tensors.to_params(
    tensors,
    tensor_maps(config),
    _expected_shapes(config),
    'a Llama of these dims',
  )


def params_to_hf(
  params: Any, config: llama.LlamaConfig
) -> dict[str, np.ndarray]:
  return hf_tensors.to_tensors(params, tensor_maps(config))


# --- whole checkpoints ---------------------------------------------------------


def _tokenizer_files(path: str, tokenizer: Optional[str]) -> dict[str, str]:
  """name -> path of the tokenizer files to copy (next to the checkpoint
  unless `tokenizer` names their dir)."""
  root = tokenizer or hf_tensors.checkpoint_root(path)
  found = {
    n: files.join(root, n)
    for n in TOKENIZER_FILES
    if files.exists(files.join(root, n))
  }
  if 'tokenizer.json' not in found:
    raise hf_tensors.ConversionError(
      f'no tokenizer.json in {root}: pass the dir that holds the '
      "checkpoint's tokenizer with `--gin.VOCAB=\"'DIR'\"`"
    )
  return found


def write_model_dir(
  model_dir: str,
  config: llama.LlamaConfig,
  params: dict,
  tokenizer_files: dict[str, str],
  source: dict,
) -> None:
  """Writes a new Llama-family model dir whole or not at all: parameters
  at step 0, model.json (with `source`: where it came from) and the
  tokenizer files under vocab/."""

  def fill(staging: str) -> None:
    hf_tensors.save_params(staging, params)
    model_files.write_model_files(
      staging, config, tokenizer_files, source=source
    )

  files.new_directory(model_dir, fill, what='model dir')


def import_hf(
  path: str,
  model_dir: str,
  tokenizer: Optional[str] = None,
  dtype: str = 'float32',
) -> llama.LlamaConfig:
  """Writes a new model dir from a Llama-family HF checkpoint dir (or its
  weights file); every tensor is checked before anything is written."""
  if files.exists(model_dir):
    raise hf_tensors.ConversionError(
      f'{model_dir} exists; choose a new directory'
    )
  hf, tensors = hf_tensors.read_hf_checkpoint(path)
  config = dataclasses.replace(config_from_hf(hf), dtype=dtype)
  tokenizer_files = _tokenizer_files(path, tokenizer)
  params = hf_to_params(tensors, config)
  write_model_dir(
    model_dir,
    config,
    params,
    tokenizer_files,
    {'format': 'huggingface', 'path': path},
  )
  return config


def export_hf(model_dir: str, out_dir: str, step: Optional[int] = None) -> None:
  """Writes a new HF dir: config.json, model.safetensors, tokenizer files."""
  config, vocab = model_files.read_model_config(model_dir)
  # HF's layout is one tensor per layer: a scanned dir's stacks are split.
  config = dataclasses.replace(config, scan_layers=False)
  params, _ = model_files.load_params(model_dir, config, step)
  tokenizer_dir = files.as_path(vocab).parent
  hf_tensors.write_hf_dir(
    out_dir,
    params_to_hf(jax.device_get(params), config),
    hf_config(config),
    {
      name: files.join(tokenizer_dir, name)
      for name in TOKENIZER_FILES
      if files.exists(files.join(tokenizer_dir, name))
    },
  )
