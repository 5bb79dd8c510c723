"""Data: the SeqIO pipeline (the only module here that imports TensorFlow:
pipeline.py), task metadata, and readers of the user's own input files."""
