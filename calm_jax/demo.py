r"""The demo: train, evaluate, calibrate and early-exit decode, in one go.

  python -m calm_jax.demo --gin_file=gin/experiments/demo.gin

Trains (or resumes, or reuses) the demo model on the embedded tasks, scores
it at full depth, certifies a softmax threshold per task with Learn then
Test on validation data, then decodes the test split at full depth and with
early exit and reports quality, test risk, average layers and the measured
speed-up. Writes runs/demo/report.json.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('demo', __doc__, argv)


if __name__ == '__main__':
  main()
