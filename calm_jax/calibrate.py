"""Command: `python -m calm_jax.calibrate` (see calm_jax.jobs.calibrate)."""
from calm_jax.jobs.calibrate import main

if __name__ == '__main__':
  main()
