#!/usr/bin/env python
"""Convert a Hugging Face model folder (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 3, Qwen3-MoE, Mixtral) or Hub id into a milora-megatron base checkpoint.

The installed command ``milora-hf-to-megatron`` is the same program (``milora-hf-to-megatron --help``); this path stays for
scripts that call it."""

import sys

from milora_megatron.cli.hf_to_megatron import main

if __name__ == "__main__":
    sys.exit(main())
