"""SeqIO registration of the embedded stand-in tasks and their mixture.

Tasks: synth_summarize (ROUGE-L), synth_translate (BLEU), synth_qa (token
F1), and the mixture synth_mix (equal rates). Vocabulary: the SentencePiece
model shipped in tasks/vocab (pad 0, EOS 1, unk 2).
"""

import functools
import pathlib

import seqio
import tensorflow as tf

from calm_jax.data import task_info
from calm_jax.scoring import metrics
from calm_jax.tasks import synthetic

VOCAB_PATH = pathlib.Path(__file__).parent / 'vocab' / 'calm_synth.model'
VOCABULARY = seqio.SentencePieceVocabulary(str(VOCAB_PATH))
OUTPUT_FEATURES = {
  'inputs': seqio.Feature(VOCABULARY, add_eos=True, required=False),
  'targets': seqio.Feature(VOCABULARY, add_eos=True),
}

# Task name -> (generator name, headline metric, seqio metric function).
TASKS = {
  'synth_summarize': ('summarize', 'rougeL', metrics.rouge),
  'synth_translate': ('translate', 'bleu', metrics.bleu),
  'synth_qa': ('qa', 'f1', metrics.squad),
}
MIXTURE = 'synth_mix'

# Lengths that hold every example of each task (EOS included).
FEATURE_LENGTHS = {
  'synth_summarize': {'inputs': 96, 'targets': 44},
  'synth_translate': {'inputs': 32, 'targets': 40},
  'synth_qa': {'inputs': 56, 'targets': 6},
}


def _dataset_fn(
  generator: str, split: str, shuffle_files: bool, seed=None
) -> tf.data.Dataset:
  del shuffle_files, seed  # Examples are already a seeded function of index.
  spec = tf.TensorSpec((), tf.string)
  return tf.data.Dataset.from_generator(
    lambda: (
      {'inputs': e['inputs'], 'targets': e['targets']}
      for e in synthetic.examples(generator, split)
    ),
    output_signature={'inputs': spec, 'targets': spec},
  )


def register() -> None:
  """Registers the tasks and the mixture (idempotent)."""
  for name, (generator, headline, metric_fn) in TASKS.items():
    task_info.register(
      name, feature_lengths=FEATURE_LENGTHS[name], headline=headline
    )
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
        functools.partial(_dataset_fn, generator),
        splits=tuple(synthetic.SPLITS),
      ),
      preprocessors=[
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=OUTPUT_FEATURES,
      metric_fns=[metric_fn],
    )
  if MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(MIXTURE, list(TASKS), default_rate=1.0)


register()
