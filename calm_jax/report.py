"""Command: `python -m calm_jax.report` (see calm_jax.jobs.report)."""
from calm_jax.jobs.report import main

if __name__ == '__main__':
  main()
