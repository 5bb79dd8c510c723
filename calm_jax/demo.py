"""Command: `python -m calm_jax.demo` (see calm_jax.jobs.demo)."""
from calm_jax.jobs.demo import main

if __name__ == '__main__':
  main()
