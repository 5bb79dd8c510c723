"""Task metrics (T5's ROUGE, BLEU and SQuAD, per corpus and per example): a
layer that data, tasks and calibration import. No JAX, no TensorFlow."""
