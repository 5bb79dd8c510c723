"""The convert job: checkpoints of other formats into and out of model dirs.

Hugging Face T5 1.1 (`model.hf_t5`) and Llama-family (`model.hf_llama`)
checkpoint dirs, told apart by their config.json's model_type, and
Llama-family GGUF files (`model.gguf_llama`).
"""

from typing import Optional

import gin

from calm_jax import arguments
from calm_jax import console
from calm_jax import errors
from calm_jax.model import gguf_llama
from calm_jax.model import hf_llama
from calm_jax.model import hf_t5
from calm_jax.model import hf_tensors
from calm_jax.model import model_files
from calm_jax.storage import files

READS = ('calm_jax.convert',)
DEFAULT_GIN_FILES = ('gin/runs/convert.gin',)


def _hf_family(path: str) -> str:
  """'llama' or 't5', from the checkpoint's config.json; another model_type
  is refused by name, with the ones that convert."""
  config_path = files.join(hf_tensors.checkpoint_root(path), 'config.json')
  if not files.exists(config_path):
    return 't5'  # hf_t5 names what is missing
  hf = files.read_json(config_path, what='HF config')
  if not isinstance(hf, dict):
    return 't5'  # hf_t5 says it is not a JSON object
  kind = hf.get('model_type')
  if kind in hf_llama.MODEL_TYPES or (
    kind is None and 'LlamaForCausalLM' in hf.get('architectures', [])
  ):
    return 'llama'
  if kind is None or kind in hf_t5.MODEL_TYPES:
    return 't5'
  supported = ', '.join(hf_t5.MODEL_TYPES + hf_llama.MODEL_TYPES)
  raise hf_tensors.ConversionError(
    f'{config_path}: model_type {kind!r} is not supported; calm_jax '
    f'converts {supported}'
  )


@gin.configurable(module='calm_jax')
def convert(
  *,
  model_dir: str = gin.REQUIRED,
  from_hf: Optional[str] = None,
  from_gguf: Optional[str] = None,
  to_hf: Optional[str] = None,
  vocab: Optional[str] = None,
  dtype: str = 'float32',
  step: Optional[int] = None,
  check_only: bool = False,
) -> None:
  """Imports `from_hf` (an HF checkpoint dir or weights file, T5 1.1 or
  Llama family) or `from_gguf` (a Llama-family GGUF file) into the new
  model dir `model_dir`, or exports `model_dir` (its latest step, or
  `step`) to the new HF dir `to_hf`. `vocab`: T5's SentencePiece model
  (default: spiece.model next to the checkpoint), or the dir of a Llama's
  tokenizer.json; `dtype`: the activation dtype of an imported model dir.
  `check_only`: check the settings, convert nothing."""
  given = [
    name
    for name, value in (
      ('FROM_HF', from_hf),
      ('FROM_GGUF', from_gguf),
      ('TO_HF', to_hf),
    )
    if value
  ]
  if len(given) != 1:
    raise errors.SettingError(
      'give one of FROM_HF or FROM_GGUF (import into MODEL_DIR) or TO_HF '
      f'(export MODEL_DIR); got {", ".join(given) or "none"}'
    )
  arguments.check(dtype=dtype)
  if step is not None:
    arguments.integer('step', step, 0)
  if check_only:
    return
  if from_gguf:
    config = gguf_llama.import_gguf(from_gguf, model_dir, dtype)
  elif from_hf and _hf_family(from_hf) == 'llama':
    config = hf_llama.import_hf(from_hf, model_dir, vocab, dtype)
  elif from_hf:
    config = hf_t5.import_hf(from_hf, model_dir, vocab, dtype)
  else:
    exporter = {'t5': hf_t5.export_hf, 'llama': hf_llama.export_hf}
    config, _ = model_files.read_model_config(model_dir)
    exporter[model_files.family_of(config)](model_dir, to_hf, step)
    console.info(f'wrote {to_hf}')
    return
  console.info(
    f'wrote {model_dir}: {model_files.family_of(config)}, '
    f'{config.num_decoder_layers} decoder layers, d_model {config.emb_dim}'
  )


def run(check_only: bool = False) -> None:
  convert(check_only=check_only)
