"""GGUF metadata that changes the computation is converted or refused by
name (small GGUF files written with the gguf package)."""

import numpy as np
import pytest

from calm_jax.model import gguf_llama
from calm_jax.model import hf_llama
from calm_jax.model import hf_tensors

gguf = pytest.importorskip('gguf')


def _write_gguf(path, fields: dict, tensors: dict) -> str:
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_uint32('llama.attention.head_count', 4)
  writer.add_uint32('llama.attention.head_count_kv', 2)
  writer.add_uint32('llama.embedding_length', 64)
  writer.add_uint32('llama.block_count', 2)
  writer.add_uint32('llama.feed_forward_length', 96)
  writer.add_uint32('llama.context_length', 256)
  writer.add_uint32('llama.vocab_size', 96)
  for key, value in fields.items():
    if isinstance(value, str):
      writer.add_string(key, value)
    else:
      writer.add_float32(key, value)
  for name, array in tensors.items():
    writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def _config(path) -> dict:
  return gguf_llama.config_from_gguf(gguf.GGUFReader(path))


def test_linear_rope_scaling_converts(tmp_path):
  path = _write_gguf(
    tmp_path / 'm.gguf',
    {'llama.rope.scaling.type': 'linear', 'llama.rope.scaling.factor': 4.0},
    {},
  )
  hf = _config(path)
  assert hf['rope_scaling'] == {'rope_type': 'linear', 'factor': 4.0}
  assert hf['max_position_embeddings'] == 256


def test_yarn_is_passed_on_and_refused(tmp_path):
  path = _write_gguf(
    tmp_path / 'm.gguf',
    {'llama.rope.scaling.type': 'yarn', 'llama.rope.scaling.factor': 4.0},
    {},
  )
  with pytest.raises(hf_tensors.ConversionError, match="'yarn' is not"):
    hf_llama.config_from_hf(_config(path))


def test_a_rope_freqs_tensor_is_refused_by_name(tmp_path):
  path = _write_gguf(
    tmp_path / 'm.gguf',
    {},
    {'rope_freqs.weight': np.ones(8, np.float32)},
  )
  with pytest.raises(
    hf_tensors.ConversionError,
    match=r'rope_freqs.weight \(per-frequency rotary',
  ):
    gguf_llama.read_gguf(path)
