"""SeqIO tasks of calm_jax.

`tasks.synthetic` (pure Python) generates the embedded stand-in tasks;
`tasks.synthetic_tasks` registers them with SeqIO (imports TensorFlow).
"""
