"""The convert job: Hugging Face T5 1.1 checkpoints into and out of model
dirs (the library is `calm_jax.model.hf_t5`)."""

from typing import Optional

import gin

from calm_jax import arguments
from calm_jax import console
from calm_jax.model import hf_t5

READS = ('calm_jax.convert',)
DEFAULT_GIN_FILES = ('gin/runs/convert.gin',)


@gin.configurable(module='calm_jax')
def convert(
  *,
  model_dir: str = gin.REQUIRED,
  from_hf: Optional[str] = None,
  to_hf: Optional[str] = None,
  vocab: Optional[str] = None,
  dtype: str = 'float32',
  step: Optional[int] = None,
  check_only: bool = False,
) -> None:
  """Imports `from_hf` (an HF checkpoint dir or weights file) into the new
  model dir `model_dir`, or exports `model_dir` (its latest step, or
  `step`) to the new HF dir `to_hf`. `vocab`: the SentencePiece model
  (default: spiece.model next to the checkpoint); `dtype`: the activation
  dtype of an imported model dir. `check_only`: check the settings,
  convert nothing."""
  if bool(from_hf) == bool(to_hf):
    raise hf_t5.ConversionError(
      'give FROM_HF (import into MODEL_DIR) or '
      'TO_HF (export MODEL_DIR), not both or '
      'neither'
    )
  arguments.check(dtype=dtype)
  if step is not None:
    arguments.integer('step', step, 0)
  if check_only:
    return
  if from_hf:
    config = hf_t5.import_hf(from_hf, model_dir, vocab, dtype)
    console.info(
      f'wrote {model_dir}: {config.num_encoder_layers}+'
      f'{config.num_decoder_layers} layers, d_model '
      f'{config.emb_dim}'
    )
  else:
    hf_t5.export_hf(model_dir, to_hf, step)
    console.info(f'wrote {to_hf}')


def run(check_only: bool = False) -> None:
  convert(check_only=check_only)
