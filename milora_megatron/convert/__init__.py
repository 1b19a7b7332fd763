"""Weight mappings between Hugging Face Llama checkpoints and megatron-core's TP layout."""
