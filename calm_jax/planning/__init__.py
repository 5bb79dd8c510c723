"""The TPU planner's library: programs compiled for a TPU topology on any
machine (the TPU compiler in libtpu, no chip), and what their compiled
memory and cost analyses say (calm_jax.plan is the command)."""
