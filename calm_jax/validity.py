r"""Does the calibration keep its promise? Random calibration/test splits.

  python -m calm_jax.validity [--gin.MODEL_DIR="'runs/demo/model'"] \
    [--gin.calm_jax.validity.splits=50] [--gin.OUTPUT_DIR="'runs/validity'"]

Reads gin/runs/validity.gin unless --gin_file is given. Per delta and
consistency, certifies on 80% of the validation examples and measures on
the other 20%, over random splits: the violation rate that Learn then Test
promises to keep at or below epsilon. Writes validity.json and validity.png.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('validity', __doc__, argv)


if __name__ == '__main__':
  main()
