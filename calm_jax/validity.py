"""Command: `python -m calm_jax.validity` (see calm_jax.jobs.validity)."""
from calm_jax.jobs.validity import main

if __name__ == '__main__':
  main()
