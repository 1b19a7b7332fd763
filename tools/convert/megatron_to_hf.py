#!/usr/bin/env python
"""Export to Hugging Face format: a merged model (default) or a PEFT LoRA adapter.

The installed command ``milora-megatron-to-hf`` is the same program (``milora-megatron-to-hf --help``); this path stays for
scripts that call it."""

import sys

from milora_megatron.cli.megatron_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
