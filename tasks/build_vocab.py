"""Trains the SentencePiece vocabulary of the embedded tasks.

Run once by the project (`make vocab`); the result is shipped in
tasks/vocab/. T5's id layout: pad 0, EOS 1, unk 2, no BOS.

  python -m calm_jax.tasks.build_vocab [--examples_per_task 20000] [--vocab_size 1024]
"""

import argparse
import io
import pathlib

import sentencepiece as spm

from calm_jax.tasks import synthetic

VOCAB_DIR = pathlib.Path(__file__).parent / 'vocab'
MODEL_PREFIX = 'calm_synth'


def corpus(examples_per_task: int):
  for task in synthetic.GENERATORS:
    for index in range(examples_per_task):
      example = synthetic.generate(task, 'train', index)
      yield example['inputs']
      yield example['targets']


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples_per_task', type=int, default=20000)
  parser.add_argument('--vocab_size', type=int, default=1024)
  args = parser.parse_args(argv)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=corpus(args.examples_per_task),
    model_writer=model,
    vocab_size=args.vocab_size,
    model_type='bpe',
    hard_vocab_limit=False,
    character_coverage=1.0,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    num_threads=2,
    minloglevel=2,
  )
  VOCAB_DIR.mkdir(exist_ok=True)
  path = VOCAB_DIR / f'{MODEL_PREFIX}.model'
  path.write_bytes(model.getvalue())
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  print(f'wrote {path}: {processor.get_piece_size()} pieces')


if __name__ == '__main__':
  main()
