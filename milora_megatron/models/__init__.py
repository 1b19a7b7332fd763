"""Llama-family model construction on megatron-core."""
