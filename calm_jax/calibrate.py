r"""Calibration: the fastest early-exit threshold certified by Learn then Test.

  python -m calm_jax.calibrate --gin_file=gin/runs/calibrate.gin \
    --gin.MODEL_DIR="'runs/demo/model'" \
    --gin.MIXTURE_OR_TASK_NAME="'synth_mix'" --gin.DELTA=0.25 \
    [--gin.EPSILON=0.05] [--gin.CONSISTENCY="'risk'"] \
    [--gin.CONFIDENCE="'state'"] [--gin.TAU=4.0]

Writes MODEL_DIR/calibration/<task>_<measure>_<consistency>_delta_eps_<hash>
.json: the certified threshold, the test table, and the fingerprint of the
model, data and settings it holds for. Decodes are cached in
MODEL_DIR/calibration/cache, so another delta or epsilon decodes nothing new.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('calibrate', __doc__, argv)


if __name__ == '__main__':
  main()
