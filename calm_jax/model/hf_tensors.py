"""What every Hugging Face importer shares: reading a checkpoint's tensors
(safetensors, sharded safetensors, PyTorch), one declarative map per tensor
(its parameter path and the layout change both ways), and the checked
conversion between a tensor dict and this project's parameter tree. The
family modules (`hf_t5`, `hf_llama`) hold only their maps and configs.
"""

import dataclasses
import os
from typing import Any
from typing import Callable
from typing import Mapping

import numpy as np
import safetensors

from calm_jax import errors
from calm_jax.storage import files

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_BIN = 'pytorch_model.bin'


class ConversionError(errors.UserError, ValueError):
  """A checkpoint that does not map onto the model (names the tensor)."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One HF tensor <-> one parameter, with the layout change both ways."""

  hf_name: str
  path: tuple[str, ...]  # into this project's params
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def same(x):
  return x


def transpose(x):
  return x.T


def projection_in(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """q/k/v: HF [heads*head_dim, embed] <-> ours [embed, heads, head_dim]."""
  return (
    lambda w: w.T.reshape(w.shape[1], heads, head_dim),
    lambda w: w.reshape(w.shape[0], heads * head_dim).T,
  )


def projection_out(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """o: HF [embed, heads*head_dim] <-> ours [heads, head_dim, embed]."""
  return (
    lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
    lambda w: w.reshape(heads * head_dim, w.shape[-1]).T,
  )


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


def checkpoint_root(path: str) -> str:
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
  config_path = files.join(checkpoint_root(path), 'config.json')
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


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> str:
  """A safetensors file, whole or not at all (local or remote)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  return files.atomic_write(
    path, lambda tmp: safetensors.numpy.save_file(dict(tensors), tmp)
  )


def save_params(model_dir: str, params: Any) -> None:
  """An imported model's parameters as step 0 of a model dir (no optimizer
  state: fine-tuning starts its own)."""
  from calm_jax.storage import checkpoints  # pylint: disable=g-import-not-at-top

  mgr = checkpoints.manager(model_dir)
  checkpoints.save_params_only(mgr, 0, params)
  mgr.close()


def write_hf_dir(
  out_dir: str,
  tensors: Mapping[str, np.ndarray],
  config_json: dict,
  other_files: Mapping[str, str],
) -> None:
  """A new Hugging Face dir, whole or not at all: model.safetensors,
  config.json and `other_files` ({name: source path}: the tokenizer)."""
  if files.exists(out_dir):
    raise ConversionError(f'{out_dir} exists; choose a new directory')

  def fill(staging: str) -> None:
    write_safetensors(files.join(staging, SAFETENSORS), tensors)
    files.atomic_write_json(files.join(staging, 'config.json'), config_json)
    for name, source in other_files.items():
      files.copy_file(source, files.join(staging, name))

  files.new_directory(out_dir, fill, what='HF dir')


def shapes_of(tree: Any) -> dict[tuple[str, ...], tuple]:
  """Parameter path -> shape of a (possibly abstract) parameter tree."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
    tuple(k.key for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def to_params(
  tensors: Mapping[str, np.ndarray],
  maps: list['TensorMap'],
  expected: dict[tuple[str, ...], tuple],
  what: str,
) -> dict:
  """The parameter tree from HF tensors, every one mapped and checked: a
  tensor missing, left over or of the wrong shape is a ConversionError
  naming it (`what`: the model, for the message)."""
  tensors, expected = dict(tensors), dict(expected)
  params = {}
  for m in maps:
    if m.hf_name not in tensors:
      raise ConversionError(f'missing tensor {m.hf_name}')
    value = np.asarray(tensors.pop(m.hf_name), np.float32)
    want = expected.pop(m.path)
    converted = m.to_ours(value) if value.size == np.prod(want) else None
    if converted is None or converted.shape != want:
      hf_shape = m.to_hf(np.zeros(want, np.float32)).shape
      raise ConversionError(
        f'tensor {m.hf_name} has shape {value.shape}; {what} holds '
        f'{hf_shape} there (for {"/".join(m.path)})'
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


def to_tensors(params: Any, maps: list['TensorMap']) -> dict[str, np.ndarray]:
  """HF tensors from our parameters (the maps' inverse layouts)."""
  return {
    m.hf_name: np.ascontiguousarray(
      m.to_hf(np.asarray(_get(params, m.path), np.float32))
    )
    for m in maps
  }
