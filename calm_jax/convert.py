r"""Import and export Hugging Face T5 1.1 checkpoints.

  python -m calm_jax.convert --gin.FROM_HF="'/models/t5-v1_1-small'" \
    --gin.MODEL_DIR="'runs/t5_1_1_small'" [--gin.VOCAB="'spiece.model'"]
  python -m calm_jax.convert --gin.MODEL_DIR="'runs/x'" --gin.TO_HF="'out/x'"

Reads gin/runs/convert.gin unless --gin_file is given. Import reads
config.json and model.safetensors (sharded too) or pytorch_model.bin, checks
every tensor's name and shape, and writes a new model dir (step 0); export
writes an untied T5 1.1 HF dir. Nothing is written when a check fails.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('convert', __doc__, argv)


if __name__ == '__main__':
  main()
