"""Llama-family GGUF files (llama.cpp's format) into model dirs (no gin).

The `gguf` package reads the file and dequantizes every tensor to float32;
the tensors get Hugging Face names and layouts (llama.cpp stores the query
and key projections with the two halves of each head's rotary pairs
interleaved: they are put back in Hugging Face's half-split order) and go
through `hf_llama`'s checked mapping. The tokenizer and its chat template
come from the same file, through transformers' GGUF reader, and are stored
as tokenizer.json and tokenizer_config.json. model.json records the file's
path and sha256.
"""

import dataclasses
import hashlib
import os
import re
import tempfile
from typing import Optional

import numpy as np

from calm_jax.model import hf_llama
from calm_jax.model import hf_tensors
from calm_jax.model import llama
from calm_jax.storage import files

# GGUF tensor names -> Hugging Face Llama names ({i}: the layer).
_LAYER_NAMES = {
  'attn_norm': 'input_layernorm',
  'ffn_norm': 'post_attention_layernorm',
  'attn_q': 'self_attn.q_proj',
  'attn_k': 'self_attn.k_proj',
  'attn_v': 'self_attn.v_proj',
  'attn_output': 'self_attn.o_proj',
  'ffn_gate': 'mlp.gate_proj',
  'ffn_up': 'mlp.up_proj',
  'ffn_down': 'mlp.down_proj',
}
_GLOBAL_NAMES = {
  'token_embd.weight': 'model.embed_tokens.weight',
  'output_norm.weight': 'model.norm.weight',
  'output.weight': 'lm_head.weight',
}


def hf_name(name: str) -> Optional[str]:
  """The Hugging Face name of a GGUF tensor (None if it has none)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  found = re.fullmatch(r'blk\.(\d+)\.(\w+)\.weight', name)
  if found and found.group(2) in _LAYER_NAMES:
    return (
      f'model.layers.{found.group(1)}.{_LAYER_NAMES[found.group(2)]}.weight'
    )
  return None


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
  """A q or k projection [heads * d, e] from llama.cpp's interleaved rotary
  layout (pairs (x0, x1), (x2, x3), ...) to the half-split one."""
  d = weight.shape[0] // heads
  pairs = weight.reshape(heads, d // 2, 2, *weight.shape[1:])
  return pairs.swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _rope_scaling(get) -> Optional[dict]:
  """transformers' rope_scaling of a GGUF's rotary scaling keys (None:
  plain); a kind other than linear is passed on, and refused by name."""
  kind = get('rope.scaling.type', 'none')
  if kind == 'none':
    return None
  scaling = {'rope_type': kind, 'factor': get('rope.scaling.factor')}
  original = get('rope.scaling.original_context_length')
  if original is not None:
    scaling['original_max_position_embeddings'] = original
  return scaling


def config_from_gguf(reader) -> dict:
  """A Hugging Face config.json of a Llama-family GGUF's metadata."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise hf_tensors.ConversionError(
      f'GGUF architecture {arch!r}: only llama maps onto this model'
    )
  get = lambda key, default=None: _field(reader, f'llama.{key}', default)
  heads = get('attention.head_count')
  names = {t.name for t in reader.tensors}
  head_dim = get('attention.key_length') or get('embedding_length') // heads
  return {
    'model_type': 'llama',
    'vocab_size': get('vocab_size')
    or len(_field(reader, 'tokenizer.ggml.tokens', [])),
    'hidden_size': get('embedding_length'),
    'num_hidden_layers': get('block_count'),
    'num_attention_heads': heads,
    'num_key_value_heads': get('attention.head_count_kv', heads),
    'intermediate_size': get('feed_forward_length'),
    'rope_theta': float(get('rope.freq_base', 10000.0)),
    'max_position_embeddings': get('context_length', 8192),
    'rope_scaling': _rope_scaling(get),
    'partial_rotary_factor': get('rope.dimension_count', head_dim) / head_dim,
    'rms_norm_eps': float(get('attention.layer_norm_rms_epsilon', 1e-6)),
    'tie_word_embeddings': 'output.weight' not in names,
  }


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(HF config, float32 tensors under HF names) of a Llama GGUF file."""
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise hf_tensors.ConversionError(
      f'cannot read the GGUF file {path} ({e.__class__.__name__}: '
      f'{str(e).splitlines()[0] if str(e) else ""})'
    ) from e
  config = config_from_gguf(reader)
  heads = {
    'q_proj': config['num_attention_heads'],
    'k_proj': config['num_key_value_heads'],
  }
  tensors = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name)
    if tensor.name == 'rope_freqs.weight':
      raise hf_tensors.ConversionError(
        f'{path}: GGUF tensor rope_freqs.weight (per-frequency rotary '
        'scaling, as Llama 3.1 GGUFs carry) is not supported; import the '
        "HF checkpoint instead (its config.json's llama3 rope_scaling "
        'converts)'
      )
    if name is None:
      raise hf_tensors.ConversionError(f'unexpected GGUF tensor {tensor.name}')
    weight = np.asarray(
      gguf.dequantize(tensor.data, tensor.tensor_type), np.float32
    )
    projection = name.split('.')[-2]
    if projection in heads:
      weight = unpermute_rotary(weight, heads[projection])
    tensors[name] = weight
  return config, tensors


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _tokenizer_files(path: str, staging: str) -> dict[str, str]:
  """tokenizer.json and tokenizer_config.json of the GGUF's tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top

  tokenizer = transformers.AutoTokenizer.from_pretrained(
    os.path.dirname(os.path.abspath(path)),
    gguf_file=os.path.basename(path),
  )
  tokenizer.save_pretrained(staging)
  return {
    name: os.path.join(staging, name)
    for name in hf_llama.TOKENIZER_FILES
    if os.path.exists(os.path.join(staging, name))
  }


def import_gguf(
  path: str, model_dir: str, dtype: str = 'float32'
) -> llama.LlamaConfig:
  """Writes a new model dir from a Llama-family GGUF file (its tensors
  dequantized to float32 parameters; `dtype` is the activation dtype)."""
  if files.exists(model_dir):
    raise hf_tensors.ConversionError(
      f'{model_dir} exists; choose a new directory'
    )
  if not os.path.isfile(path):
    raise hf_tensors.ConversionError(f'no GGUF file at {path}')
  hf, tensors = read_gguf(path)
  config = dataclasses.replace(hf_llama.config_from_hf(hf), dtype=dtype)
  params = hf_llama.hf_to_params(tensors, config)
  with tempfile.TemporaryDirectory() as staging:
    hf_llama.write_model_dir(
      model_dir,
      config,
      params,
      _tokenizer_files(path, staging),
      {
        'format': 'gguf',
        'path': os.path.abspath(path),
        'sha256': _sha256(path),
      },
    )
  return config
