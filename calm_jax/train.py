r"""Training with CALM's weighted per-layer loss (t5x-style flags).

  python -m calm_jax.train \
    --gin_file=gin/models/calm_demo.gin --gin_file=gin/runs/train.gin \
    --gin.MODEL_DIR="'runs/x'" --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" \
    [--gin.TRAIN_STEPS=2000] [--gin.BATCH_SIZE=64]

Running the same command again resumes from the latest checkpoint at the same
data position; a finished run returns at once. gin/runs/finetune.gin starts a
new model dir from another one's parameters (INITIAL_CHECKPOINT_PATH);
gin/runs/train_classifier.gin trains the learned exit classifier of a model
dir, backbone frozen. A NaN or infinite step is never applied or saved.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('train', __doc__, argv)


if __name__ == '__main__':
  main()
