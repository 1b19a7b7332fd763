"""On-disk formats: the converted base model and the adapter checkpoints of a run."""
