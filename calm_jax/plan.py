r"""The TPU planner: compiles a run's programs for a TPU topology on this
machine (the TPU compiler from libtpu; no TPU and no parameters needed).

  python -m calm_jax.plan --gin_file=gin/models/calm_t5_1_1_base.gin \
    --gin_file=gin/runs/plan.gin --gin.TOPOLOGY="'v5e:4x4'" \
    --gin.MESH_SHAPE="(8, 2)" [--gin.OUTPUT="'runs/plan/base.json'"]

Per program (the train steps
of both stages; the full-depth, early-exit and exact-mode decoders; one
decode position at full depth and exiting after each layer; a verify pass):
compile time, per-device argument / temp / output / alias bytes against the
chip's HBM, FLOPs and bytes per device and the roofline lower bound on the
time (labelled a bound: never a timing). A program that does not fit is
refused in one line (exit 2). `make tpu-plan` installs libtpu into .tpu/
and writes docs/tpu_plan.md.
"""

from calm_jax import cli


def main(argv=None) -> None:
  cli.main('plan', __doc__, argv)


if __name__ == '__main__':
  main()
