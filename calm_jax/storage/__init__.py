"""What lives on disk: model dirs and verified orbax checkpoints,
whole-or-nothing files, content fingerprints, Hugging Face conversion."""
